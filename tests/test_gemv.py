"""The AVX2 fp32 / bf16 decode kernels (`model/gemv.py`, `csrc/gemv_avx2.cpp`) equal the plain products: one
matrix product against F.linear, the experts op against the loop reference, and a model's decode logits
with them against the same model without them (eager and compiled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DECODE, make_moe, moe_cfg, no_loop, ref_moe, tiny_model
from tinymixtral.cache import KVCache
from tinymixtral.generation import decode_compiled
from tinymixtral.model import fast, gemv

pytestmark = pytest.mark.skipif(not gemv.ready(), reason="no AVX2 + FMA, or the kernels did not build")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def off(monkeypatch):
    """Call off() to run without the kernels (as on a CPU without AVX2)."""
    return lambda: monkeypatch.setattr(gemv, "ready", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("N,K", [(96, 48), (97, 33), (1, 7), (300, 256), (4101, 64)])  # odd rows, tails, threads
def test_mv_equals_f_linear(dtype, M, N, K):
    torch.manual_seed(0)
    x, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
    with torch.no_grad():
        y = gemv.linear(x, w)
    assert y.shape == (M, N) and y.dtype == dtype
    tol = TOL[dtype] * K ** 0.5  # sums of K products of ~1 (fp32: the order of the sums differs)
    torch.testing.assert_close(y, F.linear(x, w), rtol=tol, atol=tol)


def test_mv_takes_strided_rows_and_leading_dims():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 80)[..., :64], torch.randn(40, 64)  # rows of x 80 apart
    with torch.no_grad():
        torch.testing.assert_close(gemv.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        x_cols = x.mT.contiguous().mT[0]  # [3, 64] with a column stride of 3: copied first
        torch.testing.assert_close(gemv.linear(x_cols, w), F.linear(x_cols, w), rtol=1e-5, atol=1e-5)


def test_linear_uses_the_kernel_for_a_few_rows_only_and_never_under_autograd(monkeypatch):
    calls, mv = [], torch.ops.tinymixtral_gemv.mv
    monkeypatch.setattr(gemv, "linear", lambda x, w: calls.append(x.shape) or mv(x.reshape(-1, x.shape[-1]), w))
    x, w = torch.randn(1, 1, 32), torch.randn(64, 32, requires_grad=True)
    fast.linear(x, w)  # grad enabled: not the kernel
    with torch.no_grad():
        fast.linear(torch.randn(fast.FEW_ROWS + 1, 32), w)  # prefill: F.linear
        fast.linear(x.bfloat16(), w.bfloat16())
        fast.linear(x, w)
    assert calls == [(1, 1, 32)] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,E,K,D,Fd", [(1, 8, 2, 48, 40), (3, 8, 2, 48, 40), (2, 4, 1, 33, 17), (1, 6, 3, 64, 100),
                                        (16, 4, 2, 16, 8), (11, 3, 2, 40, 24), (9, 1, 1, 24, 16)])
def test_experts_equal_the_loop_reference(dtype, N, E, K, D, Fd):
    """Σ_k weight_k · expert_k(x): repeated experts across tokens, odd D and F, more tokens than experts."""
    torch.manual_seed(0)
    x = torch.randn(N, D, dtype=dtype)
    w13, w2 = torch.randn(E, 2 * Fd, D, dtype=dtype) * 0.3, torch.randn(E, D, Fd, dtype=dtype) * 0.3
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    weights = torch.rand(N, K).softmax(-1)
    with torch.no_grad():
        y = gemv.experts(x, w13, w2, experts, weights)
    ref, _ = ref_moe(x[None].float(), torch.zeros(E, D), w13.float(), w2.float(), K, routing=(weights, experts))
    assert y.shape == (N, D) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref[0], rtol=TOL[dtype] * 3, atol=TOL[dtype] * 3)


@pytest.mark.parametrize("S", [3, 16])
def test_moe_takes_the_experts_op_at_decode(monkeypatch, S):
    """A few tokens under no_grad (a decode step, a short prompt's prefill): one op for all chosen experts, neither
    experts_few nor the grouped path."""
    cfg = moe_cfg(E=8, K=2)
    m = make_moe(cfg).eval()
    x = torch.randn(1, S, cfg.d_model)
    ref, _ = ref_moe(x, m.router.weight, m.experts.w13, m.experts.w2, 2)
    monkeypatch.setattr(fast, "grouped_mm", no_loop)
    monkeypatch.setattr(fast, "experts_few", no_loop)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,G,T,C", [(1, 4, 2, 1, 64), (3, 8, 2, 37, 64), (2, 6, 6, 300, 20), (1, 8, 1, 5, 128)])
def test_decode_attention_equals_sdpa(dtype, B, H, G, T, C):
    """One query per row and head over strided views of a cache (a layer of it, its first T slots), masked keys."""
    torch.manual_seed(0)
    q = torch.randn(B, H, 1, C, dtype=dtype)
    k_all, v_all = torch.randn(2, B, G, T + 3, C, dtype=dtype), torch.randn(2, B, G, T + 3, C, dtype=dtype)
    k, v = k_all[1, :, :, :T], v_all[1, :, :, :T]
    allowed = torch.rand(B, 1, 1, T) > 0.4
    allowed[..., -1] = True  # a planned step always sees its own key
    with torch.no_grad():
        y = gemv.attention(q.view(B, H, C), k, v, allowed.view(B, T), C ** -0.5)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, enable_gqa=G != H)
    assert y.shape == (B, H, C) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref.view(B, H, C), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,E,K,D", [(1, 8, 2, 64), (5, 4, 1, 33), (16, 6, 3, 20), (2, 2, 2, 8)])
def test_route_equals_the_router(dtype, N, E, K, D):
    """Mixtral's routing (softmax over all, top-k, renormalise), with the logits rounded to the model's dtype."""
    torch.manual_seed(0)
    x, w = torch.randn(N, D, dtype=dtype), torch.randn(E, D, dtype=dtype)
    logits, weights, experts = gemv.route(x, w, K)
    ref_logits = F.linear(x, w).float()
    ref_weights, ref_experts = ref_logits.softmax(-1).topk(K, dim=-1)
    torch.testing.assert_close(logits, ref_logits, rtol=TOL[dtype], atol=TOL[dtype] * D ** 0.5)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights / ref_weights.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("V", [1, 7, 8, 100, 32000])
def test_argmax_equals_torch(V):
    """The first maximum (ties), the first NaN where there is one, -inf rows, strided rows (logits[:, -1])."""
    torch.manual_seed(V)
    x = torch.randn(4, 3, V)[:, -1]
    x[1] = x[1].round()  # ties (whole numbers)
    x[2] = float("-inf")
    if V > 5:
        x[3, 5] = float("nan")
        x[3, V - 1] = float("nan")
    assert torch.equal(gemv.argmax(x), x.argmax(-1))


def test_router_and_attention_take_the_ops_at_inference_only(monkeypatch):
    """Attention takes its op for one-token steps only, the router for a few tokens (<= FEW_ROWS); training neither."""
    calls = []
    for name in ("attention", "route"):
        op = getattr(gemv, name)
        monkeypatch.setattr(gemv, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    model = tiny_model(DECODE)
    ids = torch.randint(0, 96, (1, 6))
    model(ids, targets_BS=ids)  # training: autograd, the router's losses
    assert calls == []
    _decode(model.eval(), ids)  # a prompt of 4, then 2 one-token steps
    L = model.cfg.n_layers
    assert calls.count("attention") == 2 * L and calls.count("route") == 3 * L


def _decode(model, ids, compiled=False):
    """Logits of a prompt of 4 then one token at a time (teacher-forced), eager or compiled steps."""
    cache = KVCache.for_model(model, 1, 256 if compiled else ids.shape[1])
    with torch.no_grad():
        out = [model(ids[:, :4], cache=cache)]
        for i in range(4, ids.shape[1]):
            pos = torch.tensor([[i]])
            out.append(decode_compiled(model, cache, ids[:, i:i + 1], pos) if compiled
                       else model(ids[:, i:i + 1], cache=cache, positions_BS=pos))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_logits_with_and_without_the_kernels(dtype, off):
    model = tiny_model(DECODE).to(dtype)
    ids = torch.randint(0, 96, (1, 14))
    fast_ = _decode(model, ids)
    off()
    plain = _decode(model, ids)
    torch.testing.assert_close(fast_, plain, rtol=TOL[dtype] * 5, atol=TOL[dtype] * 5)


@pytest.mark.slow
def test_compiled_steps_call_the_kernels(off):
    """The compiled step calls the ops as they are (fake kernels give their shapes) and equals the plain eager step."""
    torch._dynamo.reset()
    model = tiny_model(DECODE)
    ids = torch.randint(0, 96, (1, 10))
    compiled = _decode(model, ids, compiled=True)
    with torch.profiler.profile() as prof:
        _decode(model, ids[:, :5], compiled=True)
    names = {e.name for e in prof.events()}
    assert {f"tinymixtral_gemv::{op}" for op in ("mv", "experts_mv", "attn_decode", "route")} <= names
    off()
    plain = _decode(model, ids)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)
