"""Weight-only int8 / int4 quantization: error bounds, kernels vs fallback, a tiny MoE, save/load, CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, call_cli, run_cli, seeded_ids, tiny_cfg, tiny_model
from tinymixtral import cli, generate
from tinymixtral.checkpoint import load_model, save_model
from tinymixtral.errors import TinyMixtralError
from tinymixtral.model import cpu_kernels
from tinymixtral.model.cpu_kernels import int4_block, to_kernel_layout, unpack_kernel_layout
from tinymixtral.model.moe import Experts
from tinymixtral.model.quant import (
    compile_pays,
    QuantExperts,
    QuantLinear,
    dequantize,
    kernel_applies,
    pack_nibbles,
    quantize,
    quantize_int4,
    quantize_int8,
    set_compute_dtype,
    unpack_nibbles,
)
from tinymixtral.quantize import quantize_model

# int4 kernel shapes (N % 16 == 0, K % 32 == 0) everywhere but the untied head (vocab 100): that one falls back.
CFG = tiny_cfg(vocab_size=100)
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture
def torch_kernels(monkeypatch):
    """torch's CPU kernels, as where tinymixtral's AVX2 ones are off (TINYMIXTRAL_KERNELS=torch) or do not build."""
    monkeypatch.setattr(cpu_kernels, "avx2_kernels", lambda: False)


@pytest.fixture
def exact_activations(monkeypatch):
    """Our AVX2 kernels with fp32 activations (TINYMIXTRAL_KERNELS=exact), so they agree with the reference to
    fp32 rounding; the int8-activation kernels used for a few rows by default are tested in test_woq_q8.py."""
    monkeypatch.setattr(cpu_kernels, "QUANT_ACTIVATIONS", False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(CFG)


def _tiny_dir(tmp_path):
    return save_model(tiny_model(CFG), tmp_path / "fp")


# ---- pure functions ------------------------------------------------------------------------------
def test_int8_error_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(3, 24, 40) * torch.rand(3, 24, 1) * 4  # rows of different ranges, stacked like experts
    w[0, 5] = 0  # an all-zero row
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3, 24, 1) and q.abs().max() <= 127
    w_hat = dequantize(q, s)
    assert torch.isfinite(w_hat).all() and (w_hat[0, 5] == 0).all()
    err = (w - w_hat).abs().amax(dim=-1, keepdim=True)
    assert (err <= s / 2 + 4 * FP32_EPS * w.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_error_within_half_a_step_per_group(group_size):
    torch.manual_seed(0)
    w = torch.randn(2, 16, 128) + torch.randn(2, 16, 1)  # offsets: the zero point matters
    w[0, 3, :group_size] = 0  # a zero group
    w[1, 7, group_size:2 * group_size] = 0.25  # a constant group
    packed, s, z = quantize_int4(w, group_size)
    G = 128 // group_size
    assert packed.dtype == torch.uint8 and packed.shape == (2, 16, 64) and s.shape == z.shape == (2, 16, G)
    w_hat = dequantize(packed, s, z)
    assert torch.isfinite(w_hat).all()
    assert (w_hat[0, 3, :group_size] == 0).all() and torch.allclose(w_hat[1, 7, group_size:2 * group_size],
                                                                      torch.tensor(0.25))
    err = (w - w_hat).abs().reshape(2, 16, G, group_size).amax(-1)
    slack = 8 * FP32_EPS * w.abs().reshape(2, 16, G, group_size).amax(-1)  # rounding of (q - 8) s + zero
    assert (err <= s / 2 + slack).all()  # |zero| <= 128 s in every group here
    assert torch.equal(s.bfloat16().float(), s) and torch.equal(z.bfloat16().float(), z)  # bf16 values
    g = w.reshape(2, 16, G, group_size)
    assert (s * 15 >= g.amax(-1) - g.amin(-1)).all()  # rounded up: 15 steps still span each group


def test_int4_group_far_from_zero_keeps_its_bound():
    """A group whose range is tiny against its offset (|zero| > 128 s): the zero's bf16 rounding, <= |zero| / 256,
    is then what bounds the error (at the clamped ends), not half a step."""
    w = 100 + torch.linspace(0, 0.5, 32)[None, :]  # s ~ 0.034, zero ~ 100
    packed, s, z = quantize_int4(w, 32)
    err = (dequantize(packed, s, z) - w).abs().max()
    assert z.abs().item() > 128 * s.item() and err <= max(s.item() / 2, z.abs().item() / 256) + 1e-5


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert pack_nibbles(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21  # even column: low nibble


# ---- modules: kernel == dequantize-then-matmul ---------------------------------------------------
def _quant_linear(w, bits, group_size):
    m = QuantLinear(w.shape[1], w.shape[0], bits, group_size)
    m.load_state_dict(quantize(w, bits, group_size))
    return m


@pytest.mark.parametrize("kernels", ["avx2", "torch"])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64)])
def test_quant_linear_kernel_equals_dequantized_linear(bits, group_size, kernels, monkeypatch, exact_activations):
    if kernels == "torch":
        monkeypatch.setattr(cpu_kernels, "avx2_kernels", lambda: False)
    elif not cpu_kernels.avx2_kernels():
        pytest.skip("no AVX2 kernels here")
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), torch.randn(2, 3, 128)
    m = _quant_linear(w, bits, group_size)
    w_hat = dequantize(*quantize(w, bits, group_size).values())
    assert kernel_applies(bits, 48, group_size, x.device)

    m.compute_dtype = None  # fp32 activations: kernel and reference agree to rounding
    y = m(x)
    assert m._packed, "the kernel path did not run"
    torch.testing.assert_close(y, F.linear(x, w_hat), rtol=1e-5, atol=1e-5)
    m.use_kernel = False
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)

    m.use_kernel, m.compute_dtype = True, torch.bfloat16  # the default: bf16 activations, fp32 out
    y = m(x)
    assert y.dtype == torch.float32
    two_ulps = 2 * 2**-8 * y.abs().max().item()  # bf16 keeps 8 significant bits: outputs round to bf16
    torch.testing.assert_close(y, F.linear(x.bfloat16().float(), w_hat), rtol=0, atol=two_ulps)
    m.use_kernel = False  # the fallback also rounds the dequantized weight to bf16
    torch.testing.assert_close(m(x), y, rtol=0, atol=two_ulps)


def test_int4_odd_shape_falls_back(torch_kernels):
    torch.manual_seed(0)
    w, x = torch.randn(100, 64), torch.randn(4, 64)  # N=100 is not a multiple of 16: not torch's int4 kernel
    assert not kernel_applies(4, 100, 32, x.device)
    m = _quant_linear(w, 4, 32)
    m.compute_dtype = None
    torch.testing.assert_close(m(x), F.linear(x, dequantize(*quantize(w, 4, 32).values())), rtol=1e-5, atol=1e-5)
    assert not m._packed


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_quant_experts_equal_fp_experts_with_dequantized_weights(bits, group_size, exact_activations):
    torch.manual_seed(0)
    ex = Experts(CFG)
    torch.nn.init.normal_(ex.w13, 0, 0.1)
    torch.nn.init.normal_(ex.w2, 0, 0.1)
    q13, q2 = quantize(ex.w13.data, bits, group_size), quantize(ex.w2.data, bits, group_size)
    qex = QuantExperts(CFG.n_experts, CFG.d_model, CFG.d_ff, bits, group_size)
    qex.load_state_dict({("w13_" + k if k != "weight" else "w13"): v for k, v in q13.items()}
                        | {("w2_" + k if k != "weight" else "w2"): v for k, v in q2.items()})
    with torch.no_grad():
        ex.w13.copy_(dequantize(*q13.values()))
        ex.w2.copy_(dequantize(*q2.values()))
    x = torch.randn(10, CFG.d_model)
    weights = torch.rand(10, 2).softmax(-1)
    experts = torch.stack([torch.tensor([0, 2])] * 6 + [torch.tensor([2, 1])] * 4)  # expert 3 unused
    with torch.no_grad():
        ref, _ = ex(x, weights, experts)
        qex.compute_dtype = None
        y, dropped = qex(x, weights, experts)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert dropped == 0 and set(qex._packed) == {"w13", "w2"}  # through the kernel, all experts at once
        qex.use_kernel = False
        torch.testing.assert_close(qex(x, weights, experts)[0], ref, rtol=1e-5, atol=1e-5)


# ---- int4 held once, in the CPU kernel's own layout ------------------------------------------------
@pytest.mark.parametrize("N,K", [(64, 64), (96, 128), (256, 512)])
def test_kernel_layout_is_torchs_int4_packing(N, K):
    block = int4_block()
    assert block, "this torch build's int4 CPU layout is not the one cpu_kernels.py knows"
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.uint8)
    if N % block:
        pytest.skip(f"N={N} is not a multiple of the block {block}")
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    packed = to_kernel_layout(q, block)
    assert torch.equal(packed, want)
    assert torch.equal(unpack_kernel_layout(packed, block), q)
    stack = torch.stack([packed, to_kernel_layout(q.flip(0), block)])  # leading dims (experts) unpack too
    assert torch.equal(unpack_kernel_layout(stack, block), torch.stack([q, q.flip(0)]))


def test_int4_weights_are_held_once_and_saved_in_the_storage_layout(torch_kernels):
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(3, 128)
    stored = quantize(w, 4, 32)
    m = _quant_linear(w, 4, 32)
    m.compute_dtype = None
    before = m.weight
    ref = F.linear(x, dequantize(*stored.values()))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert m._layout == {"weight": int4_block()} and m.weight is not before  # re-packed as a new buffer
    (kernel_weight, _, _), = m._packed.values()
    assert kernel_weight is m.weight  # the kernel reads the module's own buffer: no second copy
    assert not torch.equal(m.weight, stored["weight"])  # really another layout...
    sd = m.state_dict()  # ...but saved in the storage layout, bit for bit
    assert all(torch.equal(sd[k], stored[k]) for k in stored)
    m.use_kernel = False  # the dequantize fallback reads the kernel layout too
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(m, backend="eager", fullgraph=True)  # the compiled few-rows path
    torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
    m.load_state_dict(quantize(-w, 4, 32))  # new weights arrive in the storage layout
    assert m._layout == {}
    m.use_kernel = True
    torch.testing.assert_close(m(x), F.linear(x, dequantize(*quantize(-w, 4, 32).values())), rtol=1e-4, atol=1e-4)


def test_int4_scales_held_in_bf16_by_our_kernels_and_saved_in_fp32(exact_activations):
    """Our AVX2 kernels read bf16 scales and zeros as stored: an fp32 model's, bf16 values since quantize_int4
    rounds them, are held in bf16 in place (half their bytes), yet state_dict gives fp32, .to() and load_state_dict
    find fp32 buffers, and the product is the same. Scales that are not bf16 values (an older quantization) stay."""
    if not cpu_kernels.ours(4):
        pytest.skip("no AVX2 int4 kernel here")
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(3, 128)
    stored = quantize(w, 4, 32)
    m = _quant_linear(w, 4, 32)
    m.compute_dtype = None
    ref = F.linear(x, dequantize(*stored.values()))
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    assert m.scales.dtype == m.zeros.dtype == torch.bfloat16  # held in bf16...
    _, s_op, z_op = m._packed["weight"]
    assert s_op is m.scales and z_op is m.zeros  # ...once: the kernel reads the buffers themselves
    sd = m.state_dict()
    assert all(sd[k].dtype == stored[k].dtype and torch.equal(sd[k], stored[k]) for k in stored)  # saved in fp32
    m.to(torch.float32)
    assert m.scales.dtype == torch.float32 and torch.equal(m.scales, stored["scales"])
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)  # held in bf16 again
    m.load_state_dict(quantize(-w, 4, 32))
    assert m.scales.dtype == torch.float32  # loaded into fp32 buffers (a bf16 one would round them)
    torch.testing.assert_close(m(x), F.linear(x, dequantize(*quantize(-w, 4, 32).values())), rtol=1e-4, atol=1e-4)
    assert m.scales.dtype == torch.bfloat16
    old = dict(stored, scales=stored["scales"] * (1 + 2 ** -12))  # not a bf16 value
    m.load_state_dict(old)
    torch.testing.assert_close(m(x), F.linear(x, dequantize(*old.values())), rtol=1e-4, atol=1e-4)
    assert m.scales.dtype == torch.float32  # kept as it came


def test_int4_model_saved_after_running_reloads_identically(tmp_path, torch_kernels):
    model = quantize_model(tiny_model(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128), 4, 32)
    x = seeded_ids(1, 12, model.cfg.vocab_size)
    with torch.no_grad():
        y = model(x)  # runs the kernel: int4 weights move to its layout
    assert any(m._layout for m in model.modules() if hasattr(m, "_layout"))
    save_model(model, tmp_path / "q")
    again = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(x), y)


# ---- a tiny MoE ----------------------------------------------------------------------------------
def _routing_agreement(ref, q) -> list[float]:
    """Per layer: fraction of tokens whose set of chosen experts is unchanged."""
    return [(a.experts_NK.sort(-1).values == b.experts_NK.sort(-1).values).all(-1).float().mean().item()
            for a, b in zip(ref.routing(), q.routing())]


@pytest.mark.parametrize("bits,group_size,max_rel,min_agree", [(8, None, 0.02, 0.95), (4, 32, 0.15, 0.85)])
def test_tiny_moe_logits_and_routing_stay_close(tiny, bits, group_size, max_rel, min_agree):
    """Measured (seeds 0-2): int8 rel. logit error 0.6-0.7%, routing 98-100%; int4 g32 8.5-9%, 94-100%."""
    qm = quantize_model(tiny, bits, group_size)
    assert isinstance(qm.layers[0].ffn.experts, QuantExperts) and isinstance(qm.layers[0].attn.wqkv, QuantLinear)
    assert isinstance(qm.lm_head, QuantLinear) and type(qm.layers[0].ffn.router.weight) is torch.nn.Parameter
    x = seeded_ids(4, 32, CFG.vocab_size, seed=1)
    with torch.no_grad():
        ref, y = tiny(x), qm(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < max_rel, rel
    assert min(_routing_agreement(tiny, qm)) >= min_agree
    for i in range(CFG.n_layers):
        assert torch.equal(qm.layers[i].ffn.router.weight, tiny.layers[i].ffn.router.weight)
    assert torch.equal(qm.embed.weight, tiny.embed.weight)


def test_save_load_generate_and_params(tmp_path, tiny, capsys):
    qm = quantize_model(tiny, 4, 32)
    save_model(qm, tmp_path / "q4")
    saved = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert saved["quantization"] == {"method": "tinymixtral-weight-only", "bits": 4, "group_size": 32,
                                     "skip": ["embed", "norm", "router"]}
    assert "quantization_config" not in saved  # transformers' key: it would try to interpret it
    loaded = load_model(tmp_path / "q4")
    assert loaded.cfg == qm.cfg
    for k, v in qm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.layers[1].ffn.router.weight, tiny.layers[1].ffn.router.weight)
    prompt = torch.tensor([[1, 5, 9, 3]])
    out = generate(loaded, prompt, max_new_tokens=8)
    assert out.shape == (1, 12) and torch.equal(out, generate(qm, prompt, max_new_tokens=8))

    save_model(tiny, tmp_path / "fp")
    save_model(quantize_model(tiny, 8), tmp_path / "q8")
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("fp", "q8", "q4")}
    assert cli.main(["params", "--model", str(tmp_path / "q8"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["disk_bytes"] == size["q8"] and size["q4"] < size["q8"] < size["fp"]
    # int8: 1 byte per quantized weight (1/4 of fp32) + a 4-byte scale per output row (12.5% here: rows of 32)
    q8 = load_model(tmp_path / "q8").state_dict()
    n_fp = sum(p.numel() for n, p in tiny.named_parameters() if "router" in n or "norm" in n or n == "embed.weight")
    n_q = sum(p.numel() for p in tiny.parameters()) - n_fp
    assert sum(t.numel() for t in q8.values() if t.dtype == torch.int8) == n_q
    n_rows = sum(t.numel() // t.shape[-1] for t in q8.values() if t.dtype == torch.int8)
    assert sum(t.numel() for k, t in q8.items() if "scales" in k) == n_rows
    assert size["q8"] < 0.4 * size["fp"] and size["q4"] < 0.3 * size["fp"]


def test_load_errors(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    save_model(quantize_model(tiny, 8), tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    sd = load_file(file)
    save_file({k: v for k, v in sd.items() if not k.endswith(".self_attn.o_proj.scales")}, file)
    with pytest.raises(TinyMixtralError, match=r"missing 2 weight\(s\): model.layers.0.self_attn.o_proj.scales"):
        load_model(tmp_path / "q")
    sd["model.layers.0.self_attn.o_proj.weight"] = sd["model.layers.0.self_attn.o_proj.weight"].float()
    save_file(sd, file)
    with pytest.raises(TinyMixtralError, match="layers.0.attn.wo.weight has dtype torch.float32"):
        load_model(tmp_path / "q")


def test_quantize_errors(tiny):
    with pytest.raises(TinyMixtralError, match="already quantized"):
        quantize_model(quantize_model(tiny, 8), 4)
    with pytest.raises(TinyMixtralError, match="--bits must be 8 or 4"):
        quantize_model(tiny, 3)
    with pytest.raises(TinyMixtralError, match=r"does not divide the input dim 32 of layers.0.attn.wqkv.weight"):
        quantize_model(tiny, 4, 64)


def test_dense_ffn_is_quantized_and_kernel_equals_fallback(tmp_path, monkeypatch):
    dense = tiny_model(CFG, n_experts=0)
    qm = set_compute_dtype(quantize_model(dense, 4, 32), None)
    assert isinstance(qm.layers[0].ffn.w13, QuantLinear) and isinstance(qm.layers[0].ffn.w2, QuantLinear)
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    monkeypatch.setattr(cpu_kernels, "QUANT_ACTIVATIONS", False)  # exact activations: equal to the fallback
    with torch.no_grad():
        y = qm(x)
        assert ((y - dense(x)).norm() / dense(x).norm()).item() < 0.15
        for m in qm.modules():
            m.use_kernel = False
        torch.testing.assert_close(qm(x), y, rtol=1e-4, atol=1e-5)
    save_model(qm, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(set_compute_dtype(load_model(tmp_path / "q"), None)(x), y)


def test_tied_head_stays_full_precision(tmp_path):
    qm = quantize_model(tiny_model(CFG, tie_embeddings=True).train(), 8)
    assert "lm_head" in qm.cfg.quantization["skip"] and qm.lm_head.weight is qm.embed.weight
    save_model(qm, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.embed.weight
    x = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qm(x))


# ---- command line --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_quantize(tmp_path):
    fp = _tiny_dir(tmp_path)
    r = run_cli("quantize", "--model", fp, "--bits", "8", "--out", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    assert "int8 per channel" in r.stdout
    model = load_model(tmp_path / "q")
    assert model.cfg.quantization["bits"] == 8 and isinstance(model.layers[0].attn.wo, QuantLinear)
    r = run_cli("quantize", "--model", fp, "--bits", "3", "--out", tmp_path / "bad")
    assert assert_one_line_error(r, "quantize", 2) == "tinymixtral quantize: error: --bits must be 8 or 4, got 3"


@pytest.mark.parametrize("flags,message", [
    (["--bits", "3"], "--bits must be 8 or 4"),
    (["--bits", "4", "--group-size", "64"], "does not divide the input dim 32 of layers.0.attn.wqkv.weight"),
    (["--bits", "4", "--group-size", "48"], "--group-size must be one of 32, 64, 128, 256"),
    (["--bits", "8", "--group-size", "32"], "--group-size is for --bits 4 only"),
    (["--bits", "8", "--model", "QUANTIZED"], "already quantized"),
    (["--bits", "8", "--model", "MISSING"], "no model directory"),
])
def test_cli_bad_input_exits_2_without_output(tmp_path, capsys, flags, message):
    fp = _tiny_dir(tmp_path)
    save_model(quantize_model(load_model(fp), 8), tmp_path / "quantized")
    names = {"QUANTIZED": str(tmp_path / "quantized"), "MISSING": str(tmp_path / "nope")}
    flags = [names.get(f, f) for f in flags]
    model = [] if "--model" in flags else ["--model", str(fp)]
    assert message in assert_one_line_error(call_cli(capsys, "quantize", *model, *flags, "--out", tmp_path / "out"),
                                            "quantize", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "quantized"]  # no output, no temp dir


def test_compile_pays_only_where_the_kernels_run(torch_kernels):
    """int4 compiled without the CPU kernel (inductor's own dequantize) was ~10x slower than eager: not worth it."""
    base = tiny_model(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
    assert compile_pays(base) and compile_pays(quantize_model(base, 8)) and compile_pays(quantize_model(base, 4, 32))
    odd = quantize_model(tiny_model(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=100), 4, 32)
    assert isinstance(odd.lm_head, QuantLinear) and not compile_pays(odd)  # its head: N=100, not a multiple of 16
    q4 = quantize_model(base, 4, 32)
    for m in q4.modules():
        if isinstance(m, QuantLinear):
            m.use_kernel = False
    assert not compile_pays(q4)
