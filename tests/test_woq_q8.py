"""The int8-activation kernels (model/csrc/woq_q8.cpp, llama.cpp's Q8_0 technique): against a plain PyTorch
reference doing the same int8-activation math (to fp32 rounding), against exact fp32 activations (within the
error bound of rounding x to 8 bits per block), experts per row, odd shapes falling back to the exact kernel,
the modules, torch.compile, and a tiny int8 model's decode against the exact-activation path."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import EXPERT_ROWS, tiny_model
from tinymixtral import generate
from tinymixtral.cache import KVCache
from tinymixtral.model import cpu_kernels
from tinymixtral.model.quant import QuantLinear, dequantize, quantize
from tinymixtral.quantize import quantize_model

pytestmark = pytest.mark.skipif(not cpu_kernels.avx2_kernels(), reason="no AVX2 kernels on this machine")
OPS = torch.ops.tinymixtral_avx2 if hasattr(torch.ops, "tinymixtral_avx2") else None


@pytest.fixture(autouse=True)
def q8_on(monkeypatch):
    """The default, whatever TINYMIXTRAL_KERNELS says in this process; int4 through ours, whatever INT4_OURS says."""
    monkeypatch.setattr(cpu_kernels, "QUANT_ACTIVATIONS", True)
    monkeypatch.setattr(cpu_kernels, "INT4_OURS", True)


def q8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: (x_hat [M, K], d [M, K]): each row in blocks of 32, d = max|x| / 127, q = round-half-even
    (x * (1 / d)), x_hat = q * d; d of each column's block."""
    M, K = x.shape
    xb = F.pad(x.float(), (0, -K % 32)).reshape(M, -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = (xb * torch.where(d != 0, 1 / d, torch.zeros_like(d))).round()
    assert q.abs().max() <= 127
    return (q * d).reshape(M, -1)[:, :K], d.expand_as(xb).reshape(M, -1)[:, :K]


def _op(x, q, bits, group_size, experts=None):
    if bits == 8:
        return OPS.int8_q8_mm(x, q["weight"], q["scales"][..., 0].contiguous(), experts)
    return OPS.int4_q8_mm(x, q["weight"], q["scales"], q["zeros"], group_size, experts)


def _check(y, x, w_hat):
    """y against the int8-activation reference to fp32 rounding, and against fp32 activations within the bound
    Σ_k |w_hat[n, k]| d_k / 2 (each x_hat is within half a step of x)."""
    x_hat, d = q8_activations(x)
    ref = x_hat @ w_hat.mT
    scale = ref.abs().max().item()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)
    bound = (d / 2) @ w_hat.abs().mT
    assert ((y - x.float() @ w_hat.mT).abs() <= bound * 1.001 + 1e-5 * scale).all()


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64), (4, 96), (4, 128)])
@pytest.mark.parametrize("N,K", [(1, 64), (5, 96), (37, 192), (100, 384), (13, 768)])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_kernel_equals_int8_activation_reference(bits, group_size, N, K, M):
    if bits == 4 and K % group_size:
        pytest.skip("K must be a multiple of the group")
    g = torch.Generator().manual_seed(N * K + M)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) * torch.rand(M, K, generator=g) * 4
    x[0, 32:64] = 0  # a block of zeros: d = 0, q = 0
    q = quantize(w, bits, group_size)
    w_hat = dequantize(*q.values())
    _check(_op(x, q, bits, group_size), x, w_hat)
    y16 = _op(x.bfloat16(), q, bits, group_size)  # bf16 activations: quantized from their fp32 values
    assert y16.dtype == torch.bfloat16
    ref16 = q8_activations(x.bfloat16().float())[0] @ w_hat.T
    torch.testing.assert_close(y16.float(), ref16, rtol=0, atol=2 * 2**-8 * ref16.abs().max().item())


def test_error_against_exact_activations_is_small():
    """The stated accuracy: on random data, a 4096-wide product is within 1e-2 of the output's scale of the
    fp32-activation one (measured ~5e-3), and the typical output within 2e-3 of it."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 4096, generator=g), torch.randn(2, 4096, generator=g)
    for bits, group_size in [(8, None), (4, 32)]:
        q = quantize(w, bits, group_size)
        exact = x @ dequantize(*q.values()).T
        err = (_op(x, q, bits, group_size) - exact).abs() / exact.abs().max()
        assert err.max() < 1e-2 and err.median() < 2e-3, (bits, err.max(), err.median())


@pytest.mark.parametrize("rows", EXPERT_ROWS)
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_each_row_its_own_expert(bits, group_size, rows):
    g = torch.Generator().manual_seed(1)
    experts = torch.tensor(rows)
    w, x = torch.randn(4, 24, 96, generator=g), torch.randn(len(rows), 96, generator=g)
    q = quantize(w, bits, group_size)
    w_hat = dequantize(*q.values())
    x_hat = q8_activations(x)[0]
    ref = torch.stack([w_hat[e] @ x_hat[m] for m, e in enumerate(experts.tolist())])
    torch.testing.assert_close(_op(x, q, bits, group_size, experts), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    strided = torch.stack([experts, experts.flip(0)], 1)[:, 0]  # a column of top-k choices, as decode passes it
    ops = cpu_kernels.kernel_operands(*q.values(), *([None] if bits == 8 else []), torch.float32, False)
    if not cpu_kernels.q8_applies(len(rows), 96, group_size):  # more than Q8_ROWS rows: exact activations
        ref = torch.stack([w_hat[e] @ x[m] for m, e in enumerate(experts.tolist())])
    torch.testing.assert_close(cpu_kernels.woq_mm(x, *ops, group_size or 0, strided), ref,
                               rtol=1e-5, atol=1e-5 * ref.abs().max())


@pytest.mark.parametrize("bits,group_size,K", [(8, None, 72), (4, 16, 80)])
def test_odd_shapes_keep_exact_activations(bits, group_size, K):
    """K (int8) or the group (int4) not a multiple of 32: the module runs the fp32-activation kernel; the op refuses."""
    torch.manual_seed(0)
    w, x = torch.randn(24, K), torch.randn(1, K)
    m = QuantLinear(K, 24, bits, group_size)
    m.load_state_dict(quantize(w, bits, group_size))
    assert not cpu_kernels.q8_applies(1, K, group_size)
    ref = x @ dequantize(*quantize(w, bits, group_size).values()).T
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
    with pytest.raises(RuntimeError, match="multiple of 32|K % 32"):
        _op(x, quantize(w, bits, group_size), bits, group_size)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
@pytest.mark.parametrize("bf16", [True, False])
def test_quant_linear_rows(bits, group_size, bf16, monkeypatch):
    """Up to Q8_ROWS rows: int8 activations; up to AVX2_ROWS: exact ones; more (a long prefill): one matmul on the
    dequantized weight, in bf16 where the CPU multiplies bf16 natively (within bf16 rounding), else fp32 (exact);
    QUANT_ACTIVATIONS False: exact at any count."""
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: bf16)
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    m = QuantLinear(96, 40, bits, group_size)
    m.load_state_dict(quantize(w, bits, group_size))
    w_hat = dequantize(*quantize(w, bits, group_size).values())
    for M in (1, cpu_kernels.Q8_ROWS):
        x = torch.randn(M, 96)
        _check(m(x), x, w_hat)
    x = torch.randn(max(cpu_kernels.Q8_ROWS, cpu_kernels.AVX2_ROWS) + 1, 96)
    ref = x @ w_hat.T
    if cpu_kernels.Q8_ROWS < cpu_kernels.AVX2_ROWS:
        torch.testing.assert_close(m(x[:cpu_kernels.Q8_ROWS + 1]), ref[:cpu_kernels.Q8_ROWS + 1], rtol=1e-5,
                                   atol=1e-5 * ref.abs().max())
    tol = 2 * 2**-8 if bf16 else 1e-5  # bf16: x and w each rounded to 8 bits of mantissa
    torch.testing.assert_close(m(x), ref, rtol=tol, atol=tol * ref.abs().max())
    monkeypatch.setattr(cpu_kernels, "QUANT_ACTIVATIONS", False)
    for rows in (x[:1], x):
        torch.testing.assert_close(m(rows), rows @ w_hat.T, rtol=1e-5, atol=1e-5 * ref.abs().max())


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16), (4, 32), (4, 48), (4, 64)])
@pytest.mark.parametrize("bf16", [True, False])
def test_dequant_op_equals_dequantize(bits, group_size, bf16):
    """The long prefill's weights: the C++ dequant equals quant.dequantize (fp32 exactly up to FMA rounding; bf16 as
    that rounded), for a stack of experts too, and with int4 scales in bf16 as a bf16 model holds them."""
    g = torch.Generator().manual_seed(3)
    q = quantize(torch.randn(3, 24, 144 if group_size == 48 else 128, generator=g), bits, group_size)
    ref = dequantize(*q.values())
    if bits == 8:
        operands = [(q["weight"], q["scales"][..., 0].contiguous(), None)]
    else:
        operands = [(q["weight"], q["scales"], q["zeros"]),
                    (q["weight"], q["scales"].bfloat16(), q["zeros"].bfloat16())]
        ref_bf16_scales = dequantize(q["weight"], q["scales"].bfloat16(), q["zeros"].bfloat16())
    for i, (w, s, z) in enumerate(operands):
        out = OPS.dequant(w, s, z, group_size or 0, bf16)
        want = ref if i == 0 else ref_bf16_scales
        assert out.shape == want.shape and out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        if bf16:
            torch.testing.assert_close(out.float(), want.bfloat16().float(), rtol=2**-8, atol=1e-6)
        else:
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_compiled_calls_the_q8_kernel(bits, group_size, monkeypatch):
    calls, op = [], cpu_kernels.q8_applies
    monkeypatch.setattr(cpu_kernels, "q8_applies", lambda *a: calls.append(op(*a)) or calls[-1])
    torch.manual_seed(0)
    w, x = torch.randn(40, 64), torch.randn(1, 64)
    m = QuantLinear(64, 40, bits, group_size)
    m.load_state_dict(quantize(w, bits, group_size))
    want = m(x)  # the eager call builds the operands that the compiled one takes
    calls.clear()
    got = torch.compile(m, fullgraph=True)(x)
    assert calls == [True]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _decode(model, ids, n_prompt):
    """(logits [steps, V], the experts chosen in every layer [steps, L, K]) of each decode step after prefilling
    ids[:, :n_prompt], fed the tokens of ids."""
    cache = KVCache.for_model(model, 1, ids.shape[1])
    model(ids[:, :n_prompt], cache=cache, positions_BS=torch.arange(n_prompt)[None])
    logits, experts = [], []
    for i in range(n_prompt, ids.shape[1]):
        logits.append(model(ids[:, i:i + 1], cache=cache, positions_BS=torch.tensor([[i]]))[:, -1])
        experts.append(torch.cat([layer.ffn.routing.experts_NK for layer in model.layers]).sort(-1).values)
    return torch.cat(logits), torch.stack(experts)


@pytest.mark.parametrize("bits", [8, 4])
def test_model_decode_against_exact_activations(bits, monkeypatch):
    """A tiny int8 / int4 MoE, teacher-forced on the same tokens, against the exact-activation path: where every
    layer picks the same experts, the decode logits agree within 3e-2 of their range (measured <= 8e-3), and the
    greedy token too wherever the exact top-2 margin exceeds twice that difference. A near-tie in a router can
    pick another expert, and then the logits differ as much as the experts do (seen once in 8 steps for int4)."""
    model = quantize_model(tiny_model(d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, std=0.1), bits,
                           32 if bits == 4 else None)
    prompt = torch.tensor([[5, 17, 3, 42, 9, 11, 2, 30, 7, 1]])
    with torch.no_grad():
        ids = generate(model, prompt, 8)
        logits, experts = _decode(model, ids, prompt.shape[1])
        monkeypatch.setattr(cpu_kernels, "QUANT_ACTIVATIONS", False)
        exact_ids = generate(model, prompt, 8)
        exact, exact_experts = _decode(model, ids, prompt.shape[1])
    assert torch.equal(ids[:, :13], exact_ids[:, :13])  # the first greedy tokens
    same = (experts == exact_experts).flatten(1).all(-1)
    assert same.sum() >= 6
    diff = (logits - exact)[same].abs().max().item()
    assert 0 < diff <= 3e-2 * (exact.max() - exact.min()).item()  # > 0: the int8 activations did run
    top2 = exact.topk(2, dim=-1).values
    clear = same & (top2[:, 0] - top2[:, 1] > 2 * diff)
    assert clear.sum() >= 3 and torch.equal(logits.argmax(-1)[clear], exact.argmax(-1)[clear])


def test_env_var_keeps_activations_exact():
    code = "from tinymixtral.model import cpu_kernels as k; assert not k.QUANT_ACTIVATIONS and not k.q8_applies(1, 64, None)"
    env = {**os.environ, "TINYMIXTRAL_KERNELS": "exact", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("group_size,K", [(32, 96), (64, 512), (128, 384), (16, 80)])
@pytest.mark.parametrize("M", [1, 3, 6])
def test_int4_bf16_scales_read_as_stored(group_size, K, M):
    """A bf16 model's int4 scales and zeros go to the kernels as they are (no fp32 copy held beside them) and
    give exactly what the same values in fp32 give: the q8 kernel, the exact one (TINYMIXTRAL_KERNELS=exact;
    group 16 takes it by default), one weight and a stack with experts per row."""
    g = torch.Generator().manual_seed(M)
    w, x = torch.randn(3, 40, K, generator=g), torch.randn(M, K, generator=g)
    q = quantize(w, 4, group_size)
    s16, z16 = q["scales"].bfloat16(), q["zeros"].bfloat16()
    ops = cpu_kernels.kernel_operands(q["weight"], s16, z16, torch.float32, False)
    assert ops[1].dtype == ops[2].dtype == torch.bfloat16 and ops[1].data_ptr() == s16.data_ptr()
    experts = torch.arange(M) % 3
    for op in (OPS.int4_q8_mm, OPS.int4_mm):
        for wq, s, z, e in ((q["weight"][1], s16[1], z16[1], None), (q["weight"], s16, z16, experts)):
            if op is OPS.int4_q8_mm and group_size % 32:
                continue
            torch.testing.assert_close(op(x, wq, s, z, group_size, e), op(x, wq, s.float(), z.float(), group_size, e),
                                       rtol=0, atol=0)
    w_hat = dequantize(q["weight"][1], s16[1].float(), z16[1].float())
    y = cpu_kernels.woq_mm(x, q["weight"][1], s16[1], z16[1], group_size, None)
    torch.testing.assert_close(y, x @ w_hat.mT, rtol=0.02, atol=0.02 * (x @ w_hat.mT).abs().max().item())


def test_vnni_flags_follow_cpuinfo():
    """The build adds the VNNI instructions /proc/cpuinfo lists (woq::dpbusd in one instruction), nothing else."""
    avx512 = "fpu avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni"
    assert cpu_kernels.vnni_flags(avx512) == ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
    assert cpu_kernels.vnni_flags("fpu avx2 fma avx_vnni avx512f") == ["-mavxvnni"]  # AVX-512 without its VNNI
    assert cpu_kernels.vnni_flags("fpu avx2 fma f16c") == []
    assert cpu_kernels.vnni_flags("avx512f avx512bw avx512_vnni") == []  # no VL: the 256-bit form is missing


@pytest.mark.parametrize("group_size,K", [(32, 64), (32, 192), (64, 384), (96, 480), (128, 640), (32, 1024)])
@pytest.mark.parametrize("M", [1, 2, 5])
def test_int4_512_bit_steps_equal_the_256_bit_ones(group_size, K, M):
    """Where the build has AVX512-VNNI, int4 takes 128 columns a step (woq_q8.cpp's i4_tile512), the 64-column
    steps after it; the same sums as the 256-bit steps alone, to fp32 rounding (tails of 64 columns, group sizes
    across steps, bf16 scales)."""
    g = torch.Generator().manual_seed(K + M)
    w, x = torch.randn(40, K, generator=g), torch.randn(M, K, generator=g)
    q = quantize(w, 4, group_size)
    for scales, zeros in ((q["scales"], q["zeros"]), (q["scales"].bfloat16(), q["zeros"].bfloat16())):
        out = {}
        try:
            for on in (True, False):
                OPS.set_int4_512(on)
                out[on] = OPS.int4_q8_mm(x, q["weight"], scales, zeros, group_size, None)
        finally:
            OPS.set_int4_512(True)
        torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5 * out[False].abs().max().item())
