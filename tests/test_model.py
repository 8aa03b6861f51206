"""The decoder: shapes, causality and sliding window, RoPE, RMSNorm and GQA attention against references,
and a short training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import seeded_ids, tiny_cfg, tiny_model
from tinymixtral.model import fast
from tinymixtral.model.attention import Attention, sliding_window_mask
from tinymixtral.model.norm import RMSNorm
from tinymixtral.model.rope import apply_rope, rope_cos_sin

MODEL = dict(d_ff=32, max_seq_len=128, rope_theta=1e4)  # tiny_cfg overrides: this file's decoder (vocab 64)


# ---- shapes, tying, routing -------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts", [0, 4])
def test_forward_shapes(n_experts):
    cfg = tiny_cfg(**MODEL, n_experts=n_experts)
    model = tiny_model(cfg)
    logits = model(seeded_ids(3, 7, 64))
    assert logits.shape == (3, 7, cfg.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    ffn_types = {type(layer.ffn).__name__ for layer in model.layers}
    assert ffn_types == ({"MoE"} if n_experts else {"FeedForward"})
    routing = model.routing()
    if n_experts == 0:
        assert routing == [] and model.router_losses() == {}
        return
    assert len(routing) == cfg.n_layers
    for r in routing:
        assert r.logits_NE.shape == (21, cfg.n_experts)
        assert r.weights_NK.shape == (21, cfg.top_k) and r.experts_NK.shape == (21, cfg.top_k)
    # each forward replaces the routing
    model(seeded_ids(1, 2, 64))
    assert all(r.logits_NE.shape == (2, cfg.n_experts) for r in model.routing())


@pytest.mark.parametrize("n_experts", [0, 4])
def test_dropout_in_training_only(n_experts):
    """set_dropout drops the embeddings and each branch's output in training, as a plain reference does with the
    same draws; eval mode and p = 0 are the model without dropout; its ffn drops inside the FFNs, in training only."""
    model = tiny_model(MODEL, n_experts=n_experts)
    ids = seeded_ids(2, 9, 64)
    with torch.no_grad():
        plain = model(ids)
        model.set_dropout(0.3)
        assert torch.equal(model(ids), plain)  # eval mode: nothing dropped
        model.train()
        torch.manual_seed(5)
        dropped = model(ids)
        torch.manual_seed(5)  # the reference: the same draws in the same order
        x = fast.dropout(model.embed(ids), 0.3)
        cos, sin = rope_cos_sin(torch.arange(9), model.cfg.head_dim, model.cfg.rope_theta, x.dtype)
        for layer in model.layers:
            x = x + fast.dropout(layer.attn(layer.attn_norm(x), cos, sin, None), 0.3)
            x = x + fast.dropout(layer.ffn(layer.ffn_norm(x)), 0.3)
        torch.testing.assert_close(dropped, model.lm_head(model.norm(x)), atol=0, rtol=0)
        assert not torch.allclose(dropped, plain)
        model.set_dropout(0.0)
        torch.testing.assert_close(model(ids), plain, atol=0, rtol=0)
        model.set_dropout(0.0, 0.3)  # the FFNs' hidden layers only (test_moe checks where)
        assert not torch.allclose(model(ids), plain)
        model.eval()
        torch.testing.assert_close(model(ids), plain, atol=0, rtol=0)


def test_routing_empty_before_forward():
    assert tiny_model(MODEL).routing() == []


def test_tied_embeddings_share_storage():
    tied = tiny_model(MODEL, tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = tiny_model(MODEL, tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    V, D = 64, 32
    assert untied.num_params() - tied.num_params() == V * D  # counted once
    with torch.no_grad():
        tied.embed.weight[3, 0] += 1.0
    assert tied.lm_head.weight[3, 0] == tied.embed.weight[3, 0]


# ---- causality and sliding window -------------------------------------------------------------------
@pytest.mark.parametrize("n_experts", [0, 4])
def test_causal(n_experts):
    model = tiny_model(MODEL, std=0.2, n_experts=n_experts)
    x = seeded_ids(2, 10, 64)
    base = model(x)
    for j in (0, 4, 9):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % 64
        out = model(x2)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-6, rtol=1e-6)
        assert (out[:, j:] - base[:, j:]).abs().amax(dim=(0, 2)).min() > 1e-5  # all later positions move


@pytest.mark.parametrize("W", [1, 3, 5])
def test_sliding_window_receptive_field(W):
    S = 12
    model = tiny_model(MODEL, std=0.2, n_layers=1, sliding_window=W)
    x = seeded_ids(1, S, 64)
    base = model(x)
    for j in range(S):
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 7) % 64
        diff = (model(x2) - base).abs().amax(dim=-1)[0]  # [S]
        changed = {i for i in range(S) if diff[i] > 1e-6}
        assert changed == set(range(j, min(j + W, S))), (j, sorted(changed))


def test_sliding_window_grows_with_layers():
    # two layers of window 3 see 2*(3-1) tokens back: position 9 depends on token 5, not on token 4
    model = tiny_model(MODEL, std=0.2, n_layers=2, sliding_window=3)
    x = seeded_ids(1, 10, 64)
    base = model(x)[0, 9]
    for j, inside in [(4, False), (5, True)]:
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 7) % 64
        moved = (model(x2)[0, 9] - base).abs().max() > 1e-6
        assert moved == inside


def test_sliding_window_no_effect_when_sequence_fits():
    full = tiny_model(MODEL, std=0.2, sliding_window=None)
    win = tiny_model(MODEL, std=0.2, sliding_window=8)
    x = seeded_ids(2, 8, 64)
    torch.testing.assert_close(win(x), full(x), atol=0, rtol=0)
    x = seeded_ids(2, 12, 64)
    assert (win(x)[:, 8:] - full(x)[:, 8:]).abs().max() > 1e-5
    torch.testing.assert_close(win(x)[:, :8], full(x)[:, :8], atol=1e-6, rtol=1e-6)


# ---- RoPE -----------------------------------------------------------------------------------------------
def test_rope_preserves_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 16)
    cos, sin = rope_cos_sin(torch.arange(100, 117), 16, 1e4, torch.float32)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert (y - x).abs().max() > 0.1
    cos0, sin0 = rope_cos_sin(torch.tensor([0]), 16, 1e4, torch.float32)
    torch.testing.assert_close(apply_rope(x[:, :, :1], cos0, sin0), x[:, :, :1])  # position 0: identity


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_relative_position(theta):
    torch.manual_seed(1)
    C = 32
    q, k = torch.randn(1, 1, 1, C), torch.randn(1, 1, 1, C)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), C, theta, torch.float32)
        cn, sn = rope_cos_sin(torch.tensor([n]), C, theta, torch.float32)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum().item()

    for m, n in [(5, 2), (3, 3), (0, 7)]:
        ref = score(m, n)
        for t in (1, 10, 50):
            assert score(m + t, n + t) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # but it does depend on the difference


@pytest.mark.parametrize("theta,head_dim", [(1e4, 16), (1e6, 64)])
def test_rope_matches_transformers(theta, head_dim):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    hf_cfg = MixtralConfig(hidden_size=128, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=4096,
                           rope_parameters={"rope_type": "default", "rope_theta": theta})
    rot = MixtralRotaryEmbedding(hf_cfg)
    positions = torch.tensor([0, 1, 2, 7, 100, 4095])
    for dtype in (torch.float32, torch.bfloat16):
        cos_hf, sin_hf = rot(torch.zeros(1, dtype=dtype), positions[None])
        cos, sin = rope_cos_sin(positions, head_dim, theta, dtype)
        assert cos.dtype == dtype
        torch.testing.assert_close(cos, cos_hf[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, sin_hf[0], atol=1e-6, rtol=0)


# ---- RMSNorm ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(48, eps=1e-5), MixtralRMSNorm(48, eps=1e-5)
    w = torch.randn(48)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (torch.randn(3, 5, 48) * 4 + 1).to(dtype)
    a, b = ours(x), theirs(x)
    assert a.dtype == b.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:  # the fp32 intermediates may differ in the last bit; at most one bf16 ulp apart
        torch.testing.assert_close(a, b, atol=1e-2, rtol=8e-3)
        assert (a != b).float().mean() < 0.05


# ---- attention ----------------------------------------------------------------------------------------------
def ref_attention(attn: Attention, x, positions, theta, window=None):
    B, S, _ = x.shape
    H, G, C = attn.n_heads, attn.n_kv_heads, attn.head_dim
    W = attn.wqkv.weight
    Wq, Wk, Wv = W[: H * C], W[H * C: (H + G) * C], W[(H + G) * C:]
    q = (x @ Wq.T).view(B, S, H, C).transpose(1, 2)
    k = (x @ Wk.T).view(B, S, G, C).transpose(1, 2)
    v = (x @ Wv.T).view(B, S, G, C).transpose(1, 2)
    cos, sin = rope_cos_sin(positions, C, theta, x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(H // G, dim=1)  # query head h uses kv head h // (H / G)
    v = v.repeat_interleave(H // G, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(C)
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, S, H * C) @ attn.wo.weight.T


@pytest.mark.parametrize("H,G", [(4, 2), (4, 1), (4, 4), (6, 3)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_reference(H, G, window):
    cfg = tiny_cfg(**MODEL, d_model=24, n_heads=H, n_kv_heads=G, head_dim=8, sliding_window=window)
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    B, S = 2, 9
    x = torch.randn(B, S, 24)
    positions = torch.arange(S)
    cos, sin = rope_cos_sin(positions, 8, cfg.rope_theta, x.dtype)
    mask = None if window is None else sliding_window_mask(S, window)
    y = attn(x, cos, sin, mask)
    y_ref = ref_attention(attn, x, positions, cfg.rope_theta, window)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_mask():
    m = sliding_window_mask(5, 2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(m, expected)


# ---- training signal ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts", [0, 4])
def test_adamw_lowers_loss(n_experts):
    cfg = tiny_cfg(**MODEL, n_experts=n_experts, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    model = tiny_model(cfg).train()
    batch = seeded_ids(4, 17, 64)
    inp, tgt = batch[:, :-1], batch[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        logits = model(inp)
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1))
        extra = model.router_losses()
        assert set(extra) == (set() if n_experts == 0 else {"aux_loss", "z_loss"})
        loss = ce + sum(extra.values())
        losses.append(ce.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(64), abs=0.3)  # the 0.02 init starts near uniform
    assert losses[-1] < losses[0] - 1.0, losses
