"""The sparse MoE layer against a plain reference, grouped matmul, routing invariants, and the
training-time routing options (load-balancing loss, z-loss, jitter, noisy top-k, capacity factor)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import make_moe, moe_cfg, no_loop, ref_keep_mask, ref_moe, ref_routing, seeded_ids, tiny_model
from tinymixtral.config import capacity
from tinymixtral.model import fast
from tinymixtral.model.fast import grouped_mm, grouped_mm_loop
from tinymixtral.model.moe import FeedForward, MoE, Router, load_balancing_loss, router_z_loss

FWD_ATOL = 1e-5
GRAD_ATOL = 1e-5


# ---- helpers -------------------------------------------------------------------------------------
def params_of(m: MoE):
    return [m.router.weight, m.experts.w13, m.experts.w2]


def grads(y, inputs, loss_kind, seed=123):
    if loss_kind == "sum":
        loss = y.sum()
    else:
        g = torch.Generator().manual_seed(seed)
        loss = (y * torch.randn(y.shape, generator=g)).sum()
    return torch.autograd.grad(loss, inputs)


# ---- 1. fast MoE == reference --------------------------------------------------------------------
CASES = {
    "top1of4": dict(E=4, K=1, shape=(2, 5)),
    "top2of8": dict(E=8, K=2, shape=(3, 7)),
    "top3of5": dict(E=5, K=3, shape=(2, 6)),
    "one_token": dict(E=4, K=2, shape=(1, 1)),
    "batch_seq": dict(E=4, K=2, shape=(4, 9)),
    "empty_experts": dict(E=6, K=2, shape=(3, 8), dead=(0, 3, 5)),
}


def case_inputs(name):
    c = CASES[name]
    cfg = moe_cfg(E=c["E"], K=c["K"])
    m = make_moe(cfg, seed=zlib.crc32(name.encode()) % 1000)  # hash() of a str changes every run
    torch.manual_seed(1)
    x = torch.randn(*c["shape"], cfg.d_model)
    if "dead" in c:
        # A constant positive feature and a strongly negative router weight on it: never chosen.
        x[..., 0] = 1.0
        with torch.no_grad():
            m.router.weight[:, 0] = 0.0
            for e in c["dead"]:
                m.router.weight[e] = 0.0
                m.router.weight[e, 0] = -50.0
    return cfg, m, x.requires_grad_()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("loss_kind", ["sum", "proj"])
def test_moe_matches_reference(name, loss_kind, monkeypatch):
    monkeypatch.setattr(fast, "grouped_mm_loop", no_loop)  # aligned sizes: the fused kernel must run
    cfg, m, x = case_inputs(name)
    y = m(x)
    y_ref, _ = ref_moe(x, *params_of(m), cfg.top_k)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=FWD_ATOL, rtol=1e-5)

    if "dead" in CASES[name]:
        counts = torch.bincount(m.routing.experts_NK.flatten(), minlength=cfg.n_experts)
        assert all(counts[e] == 0 for e in CASES[name]["dead"])
        assert (counts > 0).sum() >= 2

    inputs = [x, *params_of(m)]
    g_fast = grads(y, inputs, loss_kind)
    g_ref = grads(y_ref, inputs, loss_kind)
    for name_, a, b in zip(["x", "router", "w13", "w2"], g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=1e-5, msg=lambda s: f"grad {name_}: {s}")
    if "dead" in CASES[name]:
        for e in CASES[name]["dead"]:  # an expert that saw no token gets exactly zero gradient
            assert g_fast[2][e].abs().max() == 0 and g_fast[3][e].abs().max() == 0


@pytest.mark.parametrize("D,Fd", [(6, 8), (8, 6), (6, 6), (12, 20)])
def test_moe_matches_reference_unaligned_sizes(D, Fd):
    """grouped_mm needs 16-byte row strides; other sizes must fall back, not crash (fwd and bwd)."""
    for d, f in [(16, 8), (D, Fd)]:  # first a size that uses grouped_mm, then the odd one, same process
        cfg = moe_cfg(E=4, K=2, D=d, Fd=f)
        m = make_moe(cfg)
        x = torch.randn(2, 5, d, requires_grad=True)
        y = m(x)
        y_ref, _ = ref_moe(x, *params_of(m), cfg.top_k)
        torch.testing.assert_close(y, y_ref, atol=FWD_ATOL, rtol=1e-5)
        for a, b in zip(grads(y, [x, *params_of(m)], "sum"), grads(y_ref, [x, *params_of(m)], "sum")):
            torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=1e-5)


def test_moe_bf16_close_to_fp32_reference():
    cfg = moe_cfg(E=4, K=2)
    make_moe(cfg)  # draws the RNG to the state whose routing has no near ties (checked below)
    x = torch.randn(2, 6, cfg.d_model)
    m16 = make_moe(cfg).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    y16 = m16(x16)
    assert y16.dtype == torch.bfloat16
    # fp32 reference on the bf16-rounded values; same experts (a near tie could flip; these seeds do not)
    y_ref, _ = ref_moe(x16.float(), *[p.float() for p in params_of(m16)], cfg.top_k)
    _, _, idx = ref_routing(x16.float().reshape(-1, cfg.d_model), m16.router.weight.float(), cfg.top_k)
    assert torch.equal(m16.routing.experts_NK, idx)
    torch.testing.assert_close(y16.float(), y_ref, atol=3e-2, rtol=3e-2)


def test_moe_under_autocast_multiplies_in_bf16(monkeypatch):
    """autocast does not cover grouped_mm: Experts casts its products' operands itself, gives the gradients in
    the parameters' fp32, and stays close to the fp32 reference."""
    cfg = moe_cfg(E=4, K=2)
    make_moe(cfg)  # the same RNG state as the bf16 test above: no near ties in the routing
    x = torch.randn(2, 6, cfg.d_model, requires_grad=True)
    m = make_moe(cfg)
    seen = []
    real = fast.grouped_mm
    monkeypatch.setattr(fast, "grouped_mm", lambda a, w, *r: seen.append((a.dtype, w.dtype)) or real(a, w, *r))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 and y.dtype == torch.float32
    y_ref, _ = ref_moe(x, *params_of(m), cfg.top_k)
    torch.testing.assert_close(y, y_ref, atol=3e-2, rtol=3e-2)
    g = grads(y, [x, *params_of(m)], "proj")
    g_ref = grads(y_ref, [x, *params_of(m)], "proj")
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 3e-2 * b.abs().max()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gather_rows_equals_indexing_both_ways(k):
    """gather_rows's gather-only backward equals what indexing's scatter-add backward gives."""
    from tinymixtral.model.rows import gather_rows

    N, D = 7, 5
    order = torch.randperm(N * k)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k))
    x = torch.randn(N, D, requires_grad=True)
    y = gather_rows(x, order // k, inverse, k)
    y_ref = x.repeat_interleave(k, dim=0)[order]
    assert torch.equal(y, y_ref)
    (g,) = torch.autograd.grad(y, x, torch.randn(N * k, D, generator=torch.Generator().manual_seed(0)))
    (g_ref,) = torch.autograd.grad(y_ref, x, torch.randn(N * k, D, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_pad_groups_rows(multiple):
    """Each expert's rows start at a multiple of `multiple`, in sorted order; padding rows point past the end; a fixed
    size (compiled code) adds padding rows only."""
    from tinymixtral.model.moe import dispatch
    from tinymixtral.model.rows import pad_groups

    experts_NK = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 0], [3, 2]])
    order_M, counts_E, _ = dispatch(experts_NK, 5)
    slot_M, src_P, padded_E = pad_groups(order_M, counts_E, multiple)
    assert torch.equal(padded_E % multiple, torch.zeros(5, dtype=padded_E.dtype)) and (padded_E >= counts_E).all()
    assert len(src_P) == int(padded_E.sum()) and torch.equal(src_P[slot_M], torch.arange(10))
    start = (padded_E.cumsum(0) - padded_E).tolist()
    for e in range(5):  # expert e's rows: its assignments in sorted order, then padding (10: none)
        rows = src_P[start[e]:start[e] + int(padded_E[e])].tolist()
        mine = order_M[(experts_NK.reshape(-1)[order_M] == e)].tolist()
        assert rows == mine + [10] * (int(padded_E[e]) - len(mine))
    # fixed (compiled): the rows any routing of 10 assignments to 5 experts can need, the rest padding of the last
    # group; every assignment keeps its row
    f_slot, f_src, f_padded = pad_groups(order_M, counts_E, multiple, fixed=True)
    assert len(f_src) == (10 + 5 * (multiple - 1)) // multiple * multiple == int(f_padded.sum())
    assert torch.equal(f_slot, slot_M) and torch.equal(f_src[:len(src_P)], src_P) and (f_src[len(src_P):] == 10).all()
    assert torch.equal(f_padded[:-1], padded_E[:-1]) and f_padded[-1] % multiple == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_equals_gather_multiply_sum(dtype):
    """combine's forward and its gather-only backward equal the plain weighted sum's autograd; padding rows get
    zero gradient."""
    from tinymixtral.model.moe import dispatch
    from tinymixtral.model.rows import combine, pad_groups

    N, K, E, D = 13, 2, 4, 8
    g = torch.Generator().manual_seed(0)
    experts_NK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    order_M, counts_E, _ = dispatch(experts_NK, E)
    slot_M, src_P, _ = pad_groups(order_M, counts_E, 4)
    y_PD = torch.randn(len(src_P), D, generator=g).to(dtype).requires_grad_()
    w_NK = torch.rand(N, K, generator=g).requires_grad_()
    up = torch.randn(N, D, generator=g).to(dtype)
    out = combine(y_PD, slot_M.view(N, K), w_NK, src_P)
    ref = (y_PD.float()[slot_M.view(N, K)] * w_NK.to(dtype).float()[..., None]).sum(1).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # bf16: its rounding
    torch.testing.assert_close(out, ref, **tol)
    got = torch.autograd.grad(out, [y_PD, w_NK], up)
    want = torch.autograd.grad(ref, [y_PD, w_NK], up)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    assert (got[0][src_P == N * K] == 0).all() and (src_P == N * K).any()


def test_padded_groups_equal_unpadded(monkeypatch):
    """Experts' forward and gradients are the same with every group padded (as for a CPU's bf16 products)."""
    from tinymixtral.model import fast

    m = make_moe(moe_cfg(E=4, K=2)).train()
    x = torch.randn(2, 11, 16, requires_grad=True)
    out = {}
    for multiple in (1, 8):
        monkeypatch.setattr(fast, "group_rows", lambda x, n=multiple: n)
        y = m(x)
        out[multiple] = (y, *torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y)))
    for a, b in zip(out[1], out[8]):
        torch.testing.assert_close(a, b)


def test_hidden_dropout_is_on_each_experts_hidden_layer(monkeypatch):
    """Expert dropout (set_dropout's ffn): the MoE and the dense FFN drop their hidden layer, between the two products,
    in training only. With the draws replaced by a fixed mask of hidden units, the MoE equals the reference MoE with
    w2's masked columns, forward and gradients, and the dense FFN a plain SwiGLU likewise."""
    calls = []

    def by_unit(h, p):  # dropout with fixed draws: odd hidden units dropped
        calls.append(p)
        return h * (torch.arange(h.shape[-1]) % 2 == 0).to(h.dtype) / (1 - p)

    monkeypatch.setattr(fast, "dropout", by_unit)
    keep = lambda w: w * (torch.arange(w.shape[-1]) % 2 == 0).to(w.dtype) / (1 - 0.25)  # noqa: E731
    cfg = moe_cfg(E=4, K=2)
    m = make_moe(cfg).train()
    m.experts.dropout = 0.25
    x = torch.randn(2, 11, 16, requires_grad=True)
    y = m(x)
    assert calls == [0.25]
    router, w13, w2 = params_of(m)
    y_ref, _ = ref_moe(x, router, w13, keep(w2), cfg.top_k)
    torch.testing.assert_close(y, y_ref, atol=FWD_ATOL, rtol=1e-5)
    g = grads(y, [x, *params_of(m)], "proj")
    for a, b in zip(g, grads(y_ref, [x, *params_of(m)], "proj")):
        torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=1e-5)
    assert g[3][..., 1::2].abs().max() == 0 < g[3][..., 0::2].abs().max()  # a dropped unit's w2 column learns nothing

    ffn = FeedForward(16, 8).train()
    ffn.dropout = 0.25
    gate, up = F.linear(x, ffn.w13.weight).chunk(2, dim=-1)
    torch.testing.assert_close(ffn(x), F.linear(F.silu(gate) * up, keep(ffn.w2.weight)))
    calls.clear()
    m.eval(), ffn.eval()
    with torch.no_grad():
        m(x), ffn(x)
    assert calls == []  # evaluation never drops


# ---- 2. grouped matmul --------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [4, 4, 4, 4], [0, 1, 0, 7], [1, 0, 0, 0]])
@pytest.mark.parametrize("loss_kind", ["sum", "proj"])
def test_grouped_mm_equals_loop(counts, loss_kind, monkeypatch):
    torch.manual_seed(0)
    counts_E = torch.tensor(counts)
    M, E, I, O = int(counts_E.sum()), len(counts), 8, 12
    offs_E = counts_E.cumsum(0).to(torch.int32)
    x = torch.randn(M, I, requires_grad=True)
    w = torch.randn(E, O, I).transpose(-2, -1).requires_grad_()  # strided like Experts' weights
    y_loop = grouped_mm_loop(x, w, counts_E)
    monkeypatch.setattr(fast, "grouped_mm_loop", no_loop)
    y = grouped_mm(x, w, offs_E, counts_E)
    assert y.shape == (M, O)
    torch.testing.assert_close(y, y_loop, atol=1e-5, rtol=1e-5)
    # the loop itself against a row-by-row definition
    group = torch.repeat_interleave(torch.arange(E), counts_E)
    rows = torch.stack([x[i] @ w[group[i]] for i in range(M)])
    torch.testing.assert_close(y_loop, rows, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(y, [x, w], loss_kind), grads(y_loop, [x, w], loss_kind)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_mm_loop_handles_all_sizes():
    """The fallback works for any size, including ones grouped_mm refuses."""
    counts_E = torch.tensor([2, 0, 3])
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3, 3, 5, requires_grad=True)
    y = grouped_mm(x, w, counts_E.cumsum(0).to(torch.int32), counts_E)  # 3 and 5 floats: unaligned
    torch.testing.assert_close(y, grouped_mm_loop(x, w, counts_E))
    y.sum().backward()
    assert w.grad[1].abs().max() == 0 and w.grad[0].abs().max() > 0


# ---- 3. routing invariants -----------------------------------------------------------------------
@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (5, 3), (6, 6)])
def test_routing_invariants(E, K):
    cfg = moe_cfg(E=E, K=K)
    m = make_moe(cfg, std=1.0)
    x = torch.randn(3, 11, cfg.d_model)
    m(x)
    r = m.routing
    N = 33
    assert r.logits_NE.shape == (N, E) and r.logits_NE.dtype == torch.float32
    assert r.weights_NK.shape == (N, K) and r.experts_NK.shape == (N, K)
    torch.testing.assert_close(r.weights_NK.sum(-1), torch.ones(N))
    assert (r.weights_NK >= 0).all()
    assert (r.weights_NK[:, :-1] >= r.weights_NK[:, 1:]).all()  # best first
    # each token's K experts are distinct
    assert all(len(set(row.tolist())) == K for row in r.experts_NK)
    counts = torch.bincount(r.experts_NK.flatten(), minlength=E)
    assert counts.sum() == N * K
    assert r.n_dropped == 0
    # softmax -> top-k -> renormalise == softmax over the top-k logits alone
    top_logits, top_idx = r.logits_NE.topk(K, dim=-1)
    assert torch.equal(top_idx, r.experts_NK)
    torch.testing.assert_close(top_logits.softmax(-1), r.weights_NK, atol=1e-6, rtol=1e-5)
    # and matches the reference routing written out in this file
    _, w_ref, idx_ref = ref_routing(x.reshape(-1, cfg.d_model), m.router.weight, K)
    assert torch.equal(idx_ref, r.experts_NK)
    torch.testing.assert_close(w_ref, r.weights_NK)


# ---- 4a. load-balancing loss ----------------------------------------------------------------------
@pytest.mark.parametrize("E,K,L", [(8, 2, 3), (4, 1, 1), (5, 3, 2)])
def test_load_balancing_loss_equals_transformers(E, K, L):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(E * 10 + K)
    logits = tuple(torch.randn(13, E) * 2 for _ in range(L))
    ours = load_balancing_loss(list(logits), K)
    theirs = load_balancing_loss_func(logits, E, K)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (5, 3)])
def test_load_balancing_loss_balanced_minimum(E, K):
    # Token n prefers experts n, n+1, ..., n+K-1 (mod E) equally: every expert gets K/E of the
    # assignments and, by symmetry, a mean probability of 1/E. Loss = E * sum(K/E * 1/E) = K.
    logits = torch.zeros(E, E)
    for n in range(E):
        for j in range(K):
            logits[n, (n + j) % E] = 3.0 - 0.01 * j  # no ties inside the top-k
    balanced = load_balancing_loss([logits, logits.roll(1, dims=0)], K)
    torch.testing.assert_close(balanced, torch.tensor(float(K)))
    # all tokens sending to the same experts costs more
    skewed = torch.zeros(E, E)
    skewed[:, :K] = 3.0 - 0.01 * torch.arange(K)
    assert load_balancing_loss([skewed], K) > balanced + 0.1


def test_load_balancing_loss_has_gradient():
    logits = torch.randn(20, 6, requires_grad=True)
    loss = load_balancing_loss([logits, logits * 0.5], 2)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(g).all() and g.abs().max() > 0


MOE_MODEL = dict(vocab_size=32, d_model=16, n_heads=2, n_kv_heads=1, d_ff=16)  # tiny_cfg overrides: d_model 16


def test_router_losses_follow_coefficients():
    ids = seeded_ids(2, 6, 32)
    model = tiny_model(MOE_MODEL).train()
    model(ids)
    assert model.router_losses() == {}
    model = tiny_model(MOE_MODEL, router_aux_loss_coef=0.5, router_z_loss_coef=0.25).train()
    model(ids)
    losses = model.router_losses()
    assert set(losses) == {"aux_loss", "z_loss"}
    logits = [r.logits_NE for r in model.routing()]
    assert len(logits) == 2
    torch.testing.assert_close(losses["aux_loss"], 0.5 * load_balancing_loss(logits, 2))
    torch.testing.assert_close(losses["z_loss"], 0.25 * router_z_loss(logits))
    losses["aux_loss"].backward()
    assert model.layers[0].ffn.router.weight.grad.abs().max() > 0
    assert tiny_model(MOE_MODEL, router_aux_loss_coef=0.1).train().router_losses() == {}  # no forward pass yet
    dense = tiny_model(MOE_MODEL, seed=None, n_layers=1, n_experts=0, router_aux_loss_coef=0.5,
                       router_z_loss_coef=0.5).train()
    dense(ids)
    assert dense.router_losses() == {}


def test_aux_loss_sgd_reduces_imbalance():
    torch.manual_seed(0)
    E, K, D = 4, 2, 16
    x = torch.randn(64, D)
    x[:, 0] = 1.0
    router = Router(moe_cfg(E=E, K=K, D=D))
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
        router.weight[0, 0] = 3.0  # expert 0 wins every token,
        router.weight[1, 0] = 2.0  # expert 1 comes second

    def imbalance():  # total variation distance of the assignment fractions from uniform, x2
        with torch.no_grad():
            _, _, idx = router(x)
        frac = torch.bincount(idx.flatten(), minlength=E).float() / idx.numel()
        return (frac - 1 / E).abs().sum().item()

    before = imbalance()
    opt = torch.optim.SGD(router.parameters(), lr=0.3)
    losses = []
    for _ in range(50):
        logits, _, _ = router(x)
        loss = load_balancing_loss([logits], K)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = imbalance()
    assert before == pytest.approx(1.0)  # experts 0 and 1 take everything
    assert after < 0.25, (before, after)
    assert losses[0] > 3.5 and losses[-1] < 2.2  # towards the balanced minimum K = 2


# ---- 4b. z-loss -----------------------------------------------------------------------------------
def test_z_loss_value_and_scale():
    torch.manual_seed(0)
    logits = [torch.randn(10, 8), torch.randn(7, 8) * 3 + 1, torch.randn(10, 8) - 2]
    expected = sum(
        (torch.log(torch.exp(lg.double()).sum(-1)) ** 2).mean() for lg in logits
    ) / len(logits)
    torch.testing.assert_close(router_z_loss(logits).double(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(router_z_loss([torch.zeros(5, 8)]), torch.tensor(math.log(8) ** 2))
    base = torch.randn(16, 8) + 0.5
    values = [router_z_loss([base * s]).item() for s in (1, 2, 4, 8)]
    assert values == sorted(values) and values[-1] > 10 * values[0]
    lg = base.clone().requires_grad_()
    router_z_loss([lg]).backward()
    assert lg.grad.abs().max() > 0


# ---- 4c. router jitter ----------------------------------------------------------------------------
def seeded_train_runs(m, x, seeds):
    """(output, routing) of one train-mode forward per torch seed."""
    m.train()
    runs = []
    for seed in seeds:
        torch.manual_seed(seed)
        runs.append((m(x), m.routing))
    return runs


def test_router_jitter():
    cfg = moe_cfg(E=8, K=2, router_jitter_noise=0.5)
    m = make_moe(cfg, std=0.5)
    plain = make_moe(moe_cfg(E=8, K=2), std=0.5)
    plain.load_state_dict(m.state_dict())
    torch.manual_seed(5)
    x = torch.randn(4, 16, cfg.d_model)

    (y1, r1), (y2, r2) = seeded_train_runs(m, x, seeds=(1, 2))
    assert not torch.equal(r1.logits_NE, r2.logits_NE)
    assert not torch.equal(r1.experts_NK, r2.experts_NK)
    assert not torch.allclose(y1, y2)
    torch.manual_seed(1)
    y1b = m(x)
    assert torch.equal(y1, y1b) and torch.equal(m.routing.experts_NK, r1.experts_NK)
    # jitter touches the router input only: the experts see the clean x
    y_ref, _ = ref_moe(x, *params_of(m), cfg.top_k, routing=(r1.weights_NK, r1.experts_NK))
    torch.testing.assert_close(y1, y_ref, atol=FWD_ATOL, rtol=1e-5)

    m.eval()
    plain.eval()
    ya, yb, yp = m(x), m(x), plain(x)
    assert torch.equal(ya, yb)
    torch.testing.assert_close(ya, yp, atol=0, rtol=0)
    # without jitter, train mode is deterministic too
    plain.train()
    assert torch.equal(plain(x), plain(x))


# ---- 4d. noisy top-k gating -------------------------------------------------------------------------
def test_noisy_gating_router_structure():
    assert make_moe(moe_cfg()).router.noise is None
    noisy = make_moe(moe_cfg(E=4, noisy_gating=True))
    assert isinstance(noisy.router.noise, torch.nn.Linear)
    assert noisy.router.noise.weight.shape == (4, 16) and noisy.router.noise.bias is None


def test_noisy_gating_train_and_eval():
    cfg = moe_cfg(E=8, K=2, noisy_gating=True)
    m = make_moe(cfg, std=0.5)
    plain = make_moe(moe_cfg(E=8, K=2), std=0.5)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("router.noise")}
    plain.load_state_dict(sd)
    torch.manual_seed(5)
    x = torch.randn(4, 16, cfg.d_model)

    (y1, r1), (_, r2) = seeded_train_runs(m, x, seeds=(1, 2))
    assert not torch.equal(r1.experts_NK, r2.experts_NK)
    # logits in Routing are the clean ones (the noise only affects the selection)
    torch.testing.assert_close(r1.logits_NE, r2.logits_NE)
    torch.manual_seed(1)
    assert torch.equal(m(x), y1)
    # the output uses the noisy choice and weights
    y_ref, _ = ref_moe(x, *params_of(m), cfg.top_k, routing=(r1.weights_NK, r1.experts_NK))
    torch.testing.assert_close(y1, y_ref, atol=FWD_ATOL, rtol=1e-5)
    # weights are the softmax of the noisy logits over the chosen experts, not of the clean logits
    assert not torch.allclose(r1.weights_NK, r1.logits_NE.gather(1, r1.experts_NK).softmax(-1))

    m.eval()
    plain.eval()
    torch.testing.assert_close(m(x), plain(x), atol=0, rtol=0)
    assert torch.equal(m.routing.experts_NK, plain.routing.experts_NK)


def test_noisy_gating_noise_weight_gets_gradient_top2():
    cfg = moe_cfg(E=8, K=2, noisy_gating=True)
    m = make_moe(cfg, std=0.5).train()
    x = torch.randn(3, 8, cfg.d_model)
    torch.manual_seed(0)
    y = m(x)
    (g_noise, g_router) = grads(y, [m.router.noise.weight, m.router.weight], "proj")
    assert torch.isfinite(g_noise).all() and g_noise.abs().max() > 1e-4
    assert g_router.abs().max() > 1e-4
    # in eval mode the noise network is unused
    m.eval()
    y = m(x)
    with pytest.raises(RuntimeError):  # not part of the graph
        grads(y, [m.router.noise.weight], "proj")


def test_top1_router_gets_no_gradient_from_output():
    """Finding: with top_k=1 the renormalised weight is exactly 1, so neither the router weight nor the
    noisy-gating noise weight receives any gradient from the task loss (only the aux/z losses train
    the router; the noise weight, whose noise the aux loss never sees, is not trained at all)."""
    cfg = moe_cfg(E=4, K=1, noisy_gating=True)
    m = make_moe(cfg, std=0.5).train()
    x = torch.randn(2, 8, cfg.d_model)
    torch.manual_seed(0)
    y = m(x)
    torch.testing.assert_close(m.routing.weights_NK, torch.ones(16, 1))
    g_noise, g_router = grads(y, [m.router.noise.weight, m.router.weight], "proj")
    # zero up to rounding (w / w.sum() is 1 exactly only in exact arithmetic); top-2 gives ~1e-1
    assert g_noise.abs().max() < 1e-5 and g_router.abs().max() < 1e-5
    g = torch.autograd.grad(load_balancing_loss([m.routing.logits_NE], 1), m.router.noise.weight,
                            allow_unused=True)[0]
    assert g is None


# ---- 4e. capacity factor -----------------------------------------------------------------------------
def spy_grouped_mm(monkeypatch):
    seen = []
    real = fast.grouped_mm

    def spy(x, w, offs, counts):
        seen.append(counts.clone())
        return real(x, w, offs, counts)

    monkeypatch.setattr(fast, "grouped_mm", spy)
    return seen


def skewed_capacity_moe(cf, E=4, K=2, seed=0):
    cfg = moe_cfg(E=E, K=K, capacity_factor=cf)
    m = make_moe(cfg, seed=seed, std=0.5)
    torch.manual_seed(seed + 100)
    x = torch.randn(3, 10, cfg.d_model)
    x[..., 0] = 1.0
    with torch.no_grad():
        m.router.weight[0, 0] = 3.0  # expert 0 is popular: it overflows
        m.router.weight[1, 0] = 1.5
    return cfg, m, x.requires_grad_()


@pytest.mark.parametrize("cf,E,K", [(0.5, 4, 2), (1.0, 4, 2), (1.25, 8, 2), (0.75, 5, 1), (1.0, 5, 3)])
def test_capacity_factor_drops_first_come_first_served(cf, E, K, monkeypatch):
    cfg, m, x = skewed_capacity_moe(cf, E, K)
    m.train()
    seen = spy_grouped_mm(monkeypatch)
    y = m(x)
    N = 30
    cap = math.ceil(cf * N * K / E)
    assert cap == capacity(N, cfg)
    _, _, idx = ref_routing(x.detach().reshape(-1, cfg.d_model), m.router.weight.detach(), K)
    assert torch.equal(idx, m.routing.experts_NK)
    keep = ref_keep_mask(idx, E, cap)
    ref_dropped = int((~keep).sum())
    assert ref_dropped > 0, "test setup should overflow some expert"
    assert int(m.routing.n_dropped) == ref_dropped
    kept_counts = torch.bincount(idx[keep], minlength=E)
    assert (kept_counts <= cap).all()
    assert len(seen) == 2 and all(torch.equal(c, kept_counts) for c in seen)  # what the experts computed
    y_ref, _ = ref_moe(x, *params_of(m), K, cap=cap)
    torch.testing.assert_close(y, y_ref, atol=FWD_ATOL, rtol=1e-5)
    # a token with a dropped assignment lacks exactly that expert's contribution
    y_full, _ = ref_moe(x, *params_of(m), K)
    n = int(torch.where(~keep)[0][0])
    assert not torch.allclose(y.view(-1, cfg.d_model)[n], y_full.view(-1, cfg.d_model)[n])
    for a, b in zip(grads(y, [x, *params_of(m)], "proj"), grads(y_ref, [x, *params_of(m)], "proj")):
        torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=1e-5)


def test_large_capacity_factor_is_dropless():
    cfg, m, x = skewed_capacity_moe(100.0)
    dropless = make_moe(moe_cfg(E=4, K=2))
    dropless.load_state_dict(m.state_dict())
    m.train()
    dropless.train()
    y = m(x)
    assert m.routing.n_dropped == 0  # the same sums, but index_add rounds each term and embedding_bag does not
    torch.testing.assert_close(y, dropless(x), atol=1e-6, rtol=1e-6)


def test_capacity_not_applied_in_eval():
    cfg, m, x = skewed_capacity_moe(0.5)
    m.eval()
    y = m(x)
    assert m.routing.n_dropped == 0
    y_ref, _ = ref_moe(x, *params_of(m), cfg.top_k)
    torch.testing.assert_close(y, y_ref, atol=FWD_ATOL, rtol=1e-5)
    m.train()
    assert m(x).sub(y).abs().max() > 1e-4  # while in train mode it does drop
    assert m.routing.n_dropped > 0


# ---- 5. dense FFN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("D,Fd", [(16, 24), (6, 10)])
def test_feedforward_equals_separate_matrices(D, Fd):
    torch.manual_seed(0)
    ff = FeedForward(D, Fd)
    w1 = ff.w13.weight[:Fd].detach().clone()
    w3 = ff.w13.weight[Fd:].detach().clone()
    w2 = ff.w2.weight.detach().clone()
    assert ff.w13.weight.shape == (2 * Fd, D) and w2.shape == (D, Fd)
    x = torch.randn(2, 5, D)
    expected = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ff(x), expected, atol=1e-6, rtol=1e-5)


# ---- 6. the MoE inside the decoder ----------------------------------------------------------------
def test_moe_param_shapes():
    moe = tiny_model(d_ff=32, max_seq_len=128, rope_theta=1e4).layers[0].ffn  # d_ff 32
    assert isinstance(moe, MoE)
    assert moe.router.weight.shape == (4, 32)
    assert moe.experts.w13.shape == (4, 64, 32) and moe.experts.w2.shape == (4, 32, 32)
