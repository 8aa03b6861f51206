"""tinymixtral's AVX2 weight-only kernels with exact activations (model/csrc/woq_avx2.cpp) against dequantize-then-matmul: the ops,
odd shapes, experts per row, QuantLinear / QuantExperts decode, torch.compile, and the fallback to torch's."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import EXPERT_ROWS, tiny_model
from tinymixtral.model import cpu_kernels, quant
from tinymixtral.model.quant import QuantExperts, QuantLinear, dequantize, quantize
from tinymixtral.quantize import quantize_model

pytestmark = pytest.mark.skipif(not cpu_kernels.avx2_kernels(), reason="no AVX2 kernels on this machine")
OPS = torch.ops.tinymixtral_avx2 if hasattr(torch.ops, "tinymixtral_avx2") else None


@pytest.fixture(autouse=True)
def exact_kernels(monkeypatch):
    """These tests hold the fp32-activation kernels (TINYMIXTRAL_KERNELS=exact) to fp32 rounding; the int8-activation
    ones, the default for a few rows, are tested in test_woq_q8.py. int4 runs ours here whatever INT4_OURS says."""
    monkeypatch.setattr(cpu_kernels, "INT4_OURS", True)
    monkeypatch.setattr(cpu_kernels, "QUANT_ACTIVATIONS", False)


def _close(y, ref):
    """Equal to fp32 rounding: relative 1e-5 of the output's scale."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _op(x, q, bits, group_size, experts=None):
    if bits == 8:
        return OPS.int8_mm(x, q["weight"], q["scales"][..., 0].contiguous(), experts)
    return OPS.int4_mm(x, q["weight"], q["scales"], q["zeros"], group_size, experts)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 16), (4, 64)])
@pytest.mark.parametrize("N,K", [(1, 64), (5, 64), (37, 192), (100, 256), (13, 72 * 8)])
@pytest.mark.parametrize("M", [1, 3, 9])
def test_kernel_equals_dequantized_matmul(bits, group_size, N, K, M):
    if bits == 4 and K % group_size:
        pytest.skip("K must be a multiple of the group")
    g = torch.Generator().manual_seed(N * K + M)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    q = quantize(w, bits, group_size)
    ref = x @ dequantize(*q.values()).T
    _close(_op(x, q, bits, group_size), ref)
    y16 = _op(x.bfloat16(), q, bits, group_size)  # bf16 activations: summed in fp32, rounded once to bf16
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), x.bfloat16().float() @ dequantize(*q.values()).T,
                               rtol=0, atol=2 * 2**-8 * ref.abs().max().item())


@pytest.mark.parametrize("rows", EXPERT_ROWS)
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_each_row_its_own_expert(bits, group_size, rows):
    g = torch.Generator().manual_seed(1)
    experts = torch.tensor(rows)
    w, x = torch.randn(4, 24, 96, generator=g), torch.randn(len(rows), 96, generator=g)
    q = quantize(w, bits, group_size)
    w_hat = dequantize(*q.values())
    ref = torch.stack([w_hat[e] @ x[m] for m, e in enumerate(experts.tolist())])
    _close(_op(x, q, bits, group_size, experts), ref)
    strided = torch.stack([experts, experts.flip(0)], 1)[:, 0]  # a column of top-k choices, as decode passes it
    _close(cpu_kernels.woq_mm(x, *cpu_kernels.kernel_operands(*q.values(), *([None] if bits == 8 else []),
                                                                torch.float32, False), group_size or 0, strided), ref)
    with pytest.raises(RuntimeError, match="expert id out of range"):
        _op(x, q, bits, group_size, torch.full_like(experts, 4))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
@pytest.mark.parametrize("M", [1, 3, 9, cpu_kernels.AVX2_ROWS + 5])  # the last: prefill, a dequantized matmul
def test_quant_linear(bits, group_size, M):
    torch.manual_seed(0)
    w, x = torch.randn(40, 96), torch.randn(M, 96)
    m = QuantLinear(96, 40, bits, group_size)
    stored = quantize(w, bits, group_size)
    m.load_state_dict(stored)
    y = m(x)
    assert y.dtype == torch.float32 and m._packed
    _close(y, F.linear(x, dequantize(*stored.values())))
    ops = m._packed["weight"]
    assert ops[0] is m.weight and (bits == 8 or ops[1] is m.scales and ops[2] is m.zeros)  # no copies
    assert all(torch.equal(v, stored[k]) for k, v in m.state_dict().items())  # int4 kept in the storage layout


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_quant_experts_decode_equals_fallback(bits, group_size):
    model = quantize_model(tiny_model(d_model=64, n_heads=4, n_kv_heads=2, d_ff=96), bits, group_size)
    assert isinstance(model.layers[0].ffn.experts, QuantExperts)
    ids = torch.tensor([[3], [1], [4], [9]])  # one token a row, one row a call: the decode path (experts_few)
    with torch.no_grad():
        y = torch.cat([model(row[None]) for row in ids])
        for mod in model.modules():
            if hasattr(mod, "use_kernel"):
                mod.use_kernel = False
        ref = torch.cat([model(row[None]) for row in ids])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_quant_experts_short_prefill_one_call_per_product(bits, group_size, monkeypatch):
    """A prompt of up to FEW_ROWS tokens (more assignments than experts): each product of a layer's experts is one
    kernel call with one expert per row (no per-expert loop, no host sync), equal to the dequantized fallback."""
    model = quantize_model(tiny_model(d_model=64, n_heads=4, n_kv_heads=2, d_ff=96), bits, group_size)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    experts_calls, kernel = [], cpu_kernels.kernel_matmul
    monkeypatch.setattr(quant, "kernel_matmul", lambda *a: experts_calls.append(a[-1] is not None) or kernel(*a))
    monkeypatch.setattr(QuantExperts, "grouped_mm", lambda *a: pytest.fail("the per-expert loop ran"))
    with torch.no_grad():
        y = model(ids)
        assert sum(experts_calls) == 2 * len(model.layers)
        monkeypatch.undo()
        for mod in model.modules():
            if hasattr(mod, "use_kernel"):
                mod.use_kernel = False
        ref = model(ids)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_compiled_calls_the_kernel(bits, group_size, monkeypatch):
    calls, kernel = [], cpu_kernels.kernel_matmul
    for where in (cpu_kernels, quant):  # through woq_mm, or called directly (traced)
        monkeypatch.setattr(where, "kernel_matmul", lambda *a: calls.append(a[1].dtype) or kernel(*a))
    torch.manual_seed(0)
    w, x = torch.randn(40, 64), torch.randn(1, 64)
    m = QuantLinear(64, 40, bits, group_size)
    m.load_state_dict(quantize(w, bits, group_size))
    want = m(x)  # the eager call builds the operands that the compiled one takes
    got = torch.compile(m, fullgraph=True)(x)
    assert calls and calls[-1] == (torch.int8 if bits == 8 else torch.uint8)
    _close(got, want)


def test_env_var_falls_back_to_torchs_kernels():
    code = ("import torch; from tinymixtral.model import cpu_kernels as k; from tinymixtral.model.quant import *\n"
            "m = QuantLinear(64, 32, 8); w = torch.randn(32, 64); m.load_state_dict(quantize(w, 8)); x = torch.randn(1, 64)\n"
            "y = m(x); assert not k.avx2_kernels() and not hasattr(torch.ops.tinymixtral_avx2, 'int8_mm')\n"
            "assert m._packed['weight'][1].dtype == torch.bfloat16\n"  # torch's kernel, bf16 activations
            "torch.testing.assert_close(y, x @ dequantize(*quantize(w, 8).values()).T, rtol=0.02, atol=0.05)")
    env = {**os.environ, "TINYMIXTRAL_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_failed_build_is_one_line_and_torchs_kernels(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'x'\nc++: fatal error: ...\nmany more lines")

    monkeypatch.setattr(cpp_extension, "load", broken)
    assert cpu_kernels.load_avx2() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "tinymixtral: AVX2 kernels unavailable (Error building extension 'x'); using torch's"
    assert len([line for line in err if "building the AVX2" not in line]) == 1


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(tmp_path):
    """torch's build lock is a file, which a build killed half-way leaves behind; the next build would wait on it for
    ever. Under build_lock (an flock, dropped with its holder) it goes, and a second holder waits for the first."""
    from tinymixtral.model import kernel_build

    build_dir = tmp_path / "ext"
    build_dir.mkdir()
    (build_dir / "lock").touch()  # what a killed build leaves
    with kernel_build.build_lock(build_dir):
        assert not (build_dir / "lock").exists()
        other = subprocess.run([sys.executable, "-c", (
            "import fcntl, sys; f = open(sys.argv[1], 'w')\n"
            "try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)")
            , str(tmp_path / "ext.flock")], timeout=60)
        assert other.returncode == 3  # held: another process's build would wait here
    with kernel_build.build_lock(build_dir):  # released: taken again at once
        pass
