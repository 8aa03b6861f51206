"""The decode step as one C++ op (`model/fused.py`, `csrc/decode_step.cpp`) equals the module path it replaces:
logits and the cache it writes, step by step over a window that wraps, for fp32, int8 and int4 weights, MoE and
dense, one row and left-padded rows; where it does not apply, generation keeps the module path."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODE, tiny_model
from tinymixtral.cache import KVCache
from tinymixtral import generation
from tinymixtral.generation import fused_step, generate, left_pad
from tinymixtral.model import cpu_kernels, fused, gemv
from tinymixtral.quantize import quantize_model

pytestmark = pytest.mark.skipif(not gemv.ready(), reason="no AVX2 + FMA, or the kernels did not build")


def _model(bits, **kw):
    """bits None, 8 or 4. int8 takes both of its kernels: int8 activations for inputs of 32, exact ones for 48
    (not a multiple of 32); int4 (d_ff 64, groups of 32) int8 activations throughout."""
    model = tiny_model(DECODE, std=0.3, vary_norms=True, **{**({"d_ff": 64} if bits == 4 else {}), **kw})
    return quantize_model(model, bits).eval() if bits else model


@torch.no_grad()
def _steps(model, prompts, n, use_fused):
    """Prefill the (left-padded) prompts, then n teacher-forced decode steps: the logits [B, n, V] and the cache."""
    ids, pos = left_pad(prompts)
    B, S = ids.shape
    cache = KVCache.for_model(model, B, S + n)
    model(ids, cache=cache, positions_BS=pos)
    plan = fused.plan(model, B) if use_fused else None
    assert (plan is not None) == use_fused
    g = torch.Generator().manual_seed(1)
    out, next_pos = [], pos[:, -1:] + 1
    for _ in range(n):
        nxt = torch.randint(0, model.cfg.vocab_size, (B,), generator=g)
        out.append(fused_step(plan, cache, nxt, next_pos)[:, None] if use_fused
                   else model(nxt[:, None], cache=cache, positions_BS=next_pos))
        next_pos = next_pos + 1
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("bits,exact", [(None, False), (8, False), (4, False), (8, True), (4, True)])
@pytest.mark.parametrize("n_experts", [4, 0])
@pytest.mark.parametrize("rows", [[[5, 9, 2]], [[5, 9, 2, 7, 1], [3], [8, 8, 4]]])
def test_fused_step_equals_the_modules(bits, exact, n_experts, rows, monkeypatch):
    """exact: TINYMIXTRAL_KERNELS=exact, the activations kept in fp32 (the int8 / int4 kernels without Q8)."""
    monkeypatch.setattr(cpu_kernels, "QUANT_ACTIVATIONS", not exact)
    model = _model(bits, n_experts=n_experts)
    kinds = set(fused.plan(model, len(rows)).meta[8::2])  # each product's kernel
    assert {None: {fused.F32}, 8: {fused.I8} if exact else {fused.I8Q8, fused.I8},
            4: {fused.I4} if exact else {fused.I4Q8}}[bits] <= kinds
    fast_, c1 = _steps(model, rows, 12, True)  # 12 steps: the window of 8 slots wraps
    plain, c2 = _steps(model, rows, 12, False)
    # logits of magnitude ~7 summed in another order (the norms, the attention): fp32 rounding, ~1e-5
    torch.testing.assert_close(fast_, plain, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(c1.k, c2.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c1.v, c2.v, rtol=1e-5, atol=1e-5)
    assert torch.equal(c1.pos, c2.pos) and c1.t == c2.t


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("rows", [[[5, 9, 2, 7, 1, 3]], [[5, 9, 2, 7], [3], [8, 8, 4]]])
def test_a_short_prompt_through_the_op_equals_the_modules(bits, rows):
    """A prompt of S tokens as B S rows of one op (after two cached tokens, as in a conversation): the last
    token's logits and the cache equal the module path's prefill (SDPA over the new keys there)."""
    model = _model(bits)
    ids, pos = left_pad(rows)
    B, S = ids.shape
    got = []
    for use_fused in (True, False):
        cache = KVCache.for_model(model, B, 16)
        with torch.no_grad():
            model(torch.tensor([[1, 2]]).expand(B, 2), cache=cache)
            assert generation.fused_prompt_fits(cache, B, S)
            logits = (fused_step(fused.plan(model, B * S), cache, ids, pos + 2) if use_fused
                      else model(ids, cache=cache, positions_BS=pos + 2, last_only=True)[:, -1])
        got.append((logits, cache))
    (a, c1), (b, c2) = got
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    kept = c2.pos >= 0  # padding tokens' keys are never read (pos -1), and their queries attend to anything
    for x, y in ((c1.k, c2.k), (c1.v, c2.v)):
        torch.testing.assert_close(x.permute(1, 3, 0, 2, 4)[kept], y.permute(1, 3, 0, 2, 4)[kept], rtol=1e-5, atol=1e-5)
    assert torch.equal(c1.pos, c2.pos) and c1.t == c2.t == 2 + S and kept.all() == (B == 1)  # padding where B > 1
    cache = KVCache.for_model(model, B, 16)
    cache.t = 7
    assert not generation.fused_prompt_fits(cache, B, S) and not generation.fused_prompt_fits(cache, 17, 1)
    cache.t = 16  # wrapped twice: slot 0 again, but the prompt's keys would overwrite ones it still needs
    assert not generation.fused_prompt_fits(cache, 1, 3)


@torch.no_grad()
def test_a_conversation_past_the_window_equals_the_module_path(monkeypatch):
    """Turns of a chat on one rolling cache, the later ones after it has wrapped: the same tokens through the op as
    through the modules (short prompts go through the op only while the cache has not wrapped)."""
    model = _model(None)
    turns = [[3, 9, 4], [7, 7, 1, 2], [5, 6]]
    got = []
    for on in (True, False):
        monkeypatch.setattr(fused, "ENABLED", on)
        cache, out = KVCache.for_model(model, 1, 64), []
        for prompt in turns:
            out.append([int(t) for t in generation.stream(model, [prompt], 6, cache=cache)])
        got.append((out, cache))
    (a, c1), (b, c2) = got
    assert a == b and c1.t == c2.t > 2 * c1.slots and torch.equal(c1.pos, c2.pos)
    torch.testing.assert_close(c1.k, c2.k, rtol=1e-5, atol=1e-5)  # the keys of every layer the turns left
    torch.testing.assert_close(c1.v, c2.v, rtol=1e-5, atol=1e-5)


def test_fused_step_without_a_window_and_a_tied_head():
    model = _model(None, sliding_window=None, tie_embeddings=True, rope_theta=1e4)
    fast_, _ = _steps(model, [[1, 2, 3, 4]], 10, True)
    plain, _ = _steps(model, [[1, 2, 3, 4]], 10, False)
    torch.testing.assert_close(fast_, plain, rtol=1e-5, atol=1e-5)


def test_generation_takes_the_op_eagerly_and_the_modules_where_it_does_not_apply(monkeypatch):
    model = _model(8)
    calls = []
    real = fused.op()
    monkeypatch.setattr(fused, "op", lambda: lambda *a: calls.append(1) or real(*a))  # every call of the op
    x = torch.tensor([[4, 5, 6]])
    a = generate(model, x, 6, compile=False)
    assert len(calls) == 6  # the prompt, then one op a step (the last token is never fed)
    monkeypatch.setattr(fused, "ENABLED", False)
    b = generate(model, x, 6, compile=False)
    assert len(calls) == 6 and torch.equal(a, b)
    monkeypatch.setattr(fused, "ENABLED", True)
    assert fused.plan(tiny_model(DECODE).to(torch.bfloat16), 1) is None  # bf16 activations: the module path
    assert fused.plan(model, 17) is None  # more rows than FEW_ROWS
    model.layers[0].attn.wo = torch.nn.Linear(32, 32, bias=True)  # a module it does not know
    assert fused.plan(model, 1) is None
    generate(model, x, 3, compile=False)
    assert len(calls) == 6


def test_the_op_refuses_operands_that_do_not_match():
    model = _model(None)
    plan = fused.plan(model, 1)
    cache = KVCache.for_model(model, 1, 8)
    bad = fused.Plan(plan.weights[:-1], plan.meta, plan.inv_freq, plan.eps)
    with pytest.raises(RuntimeError, match="decode_step"):
        fused_step(bad, cache, torch.tensor([[1]]), torch.tensor([[0]]))
    with pytest.raises(RuntimeError, match="decode_step"):
        fused_step(plan, cache, torch.tensor([[10_000]]), torch.tensor([[0]]))  # a token id past the vocabulary


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_one_team_for_the_step_equals_a_region_per_product(bits):
    """With 2 threads the op hands the products of a step to one team of threads (csrc/team.h) instead of opening
    an OpenMP region for each: each output row is computed by the same code whichever thread takes it, so the
    logits and the cache are the same, bit for bit. Shapes large enough that the products split."""
    model = _model(bits, d_model=128, d_ff=256, vocab_size=1024)
    ops, threads = torch.ops.tinymixtral_gemv, torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = ops.team_shares()
        team, c1 = _steps(model, [[5, 9, 2], [7, 1, 3]], 10, True)
        assert ops.team_shares() > before  # the workers took shares
        was = ops.set_team(False)
        try:
            regions, c2 = _steps(model, [[5, 9, 2], [7, 1, 3]], 10, True)
        finally:
            ops.set_team(was)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(team, regions) and torch.equal(c1.k, c2.k) and torch.equal(c1.v, c2.v)


def test_logits_of_a_step_are_not_reused_by_the_next():
    """The op keeps its intermediate tensors from step to step (a per-plan arena, csrc/team.h); the logits it returns
    are the caller's: the next step writes elsewhere, and they keep their values."""
    model = _model(4)
    ids, pos = left_pad([[5, 9, 2]])
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(ids, cache=cache, positions_BS=pos)
        plan = fused.plan(model, 1)
        first = fused_step(plan, cache, torch.tensor([4]), torch.tensor([[3]]))[0]  # a view: the tensor itself dropped
        kept = first.clone()
        second = fused_step(plan, cache, torch.tensor([7]), torch.tensor([[4]]))[0]
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, kept) and not torch.equal(first, second)
