"""The decoder: shapes, causality and sliding window, RoPE, RMSNorm and GQA attention against references,
a short training run, and config validation / HF config round trips."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from tinymixtral.config import PRESETS, ModelConfig
from tinymixtral.errors import TinyMixtralError
from tinymixtral.model.attention import Attention, sliding_window_mask
from tinymixtral.model.moe import MoE
from tinymixtral.model.norm import RMSNorm
from tinymixtral.model.rope import apply_rope, rope_cos_sin
from tinymixtral.model.transformer import Transformer


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, n_experts=4, top_k=2,
                max_seq_len=128, rope_theta=1e4)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed=0, std=None) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if std is not None:  # larger weights than the 0.02 init, so every component visibly matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.endswith("norm.weight"):
                    p.normal_(0.0, std)
    return model.eval()


def ids(B, S, V=64, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


# ---- shapes, tying, routing -------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts", [0, 4])
def test_forward_shapes(n_experts):
    cfg = tiny_cfg(n_experts=n_experts)
    model = build(cfg)
    logits = model(ids(3, 7))
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
    model(ids(1, 2))
    assert all(r.logits_NE.shape == (2, cfg.n_experts) for r in model.routing())


def test_routing_empty_before_forward():
    assert build(tiny_cfg()).routing() == []


def test_tied_embeddings_share_storage():
    tied = build(tiny_cfg(tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = build(tiny_cfg(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    V, D = 64, 32
    assert untied.num_params() - tied.num_params() == V * D  # counted once
    with torch.no_grad():
        tied.embed.weight[3, 0] += 1.0
    assert tied.lm_head.weight[3, 0] == tied.embed.weight[3, 0]


def test_moe_param_shapes():
    cfg = tiny_cfg()
    moe = build(cfg).layers[0].ffn
    assert isinstance(moe, MoE)
    assert moe.router.weight.shape == (4, 32)
    assert moe.experts.w13.shape == (4, 64, 32) and moe.experts.w2.shape == (4, 32, 32)


# ---- causality and sliding window -------------------------------------------------------------------
@pytest.mark.parametrize("n_experts", [0, 4])
def test_causal(n_experts):
    model = build(tiny_cfg(n_experts=n_experts), std=0.2)
    x = ids(2, 10)
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
    model = build(tiny_cfg(n_layers=1, sliding_window=W), std=0.2)
    x = ids(1, S)
    base = model(x)
    for j in range(S):
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 7) % 64
        diff = (model(x2) - base).abs().amax(dim=-1)[0]  # [S]
        changed = {i for i in range(S) if diff[i] > 1e-6}
        assert changed == set(range(j, min(j + W, S))), (j, sorted(changed))


def test_sliding_window_grows_with_layers():
    # two layers of window 3 see 2*(3-1) tokens back: position 9 depends on token 5, not on token 4
    model = build(tiny_cfg(n_layers=2, sliding_window=3), std=0.2)
    x = ids(1, 10)
    base = model(x)[0, 9]
    for j, inside in [(4, False), (5, True)]:
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 7) % 64
        moved = (model(x2)[0, 9] - base).abs().max() > 1e-6
        assert moved == inside


def test_sliding_window_no_effect_when_sequence_fits():
    full = build(tiny_cfg(sliding_window=None), std=0.2)
    win = build(tiny_cfg(sliding_window=8), std=0.2)
    x = ids(2, 8)
    torch.testing.assert_close(win(x), full(x), atol=0, rtol=0)
    x = ids(2, 12)
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
    cfg = tiny_cfg(d_model=24, n_heads=H, n_kv_heads=G, head_dim=8, sliding_window=window)
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
    cfg = tiny_cfg(n_experts=n_experts, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    batch = ids(4, 17)
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


# ---- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_experts=4, top_k=5), "top_k"),
        (dict(n_experts=4, top_k=0), "top_k"),
        (dict(head_dim=7), "head_dim"),
        (dict(d_model=12, n_heads=4), "head_dim"),  # 12 / 4 = 3: odd
        (dict(d_model=0), "d_model"),
        (dict(n_layers=-1), "n_layers"),
        (dict(n_heads=0), "n_heads"),
        (dict(d_ff=0), "d_ff"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(router_jitter_noise=1.5), "router_jitter_noise"),
        (dict(n_experts=-1), "n_experts"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_config_rejects_impossible_values(kwargs, field):
    with pytest.raises(TinyMixtralError, match=rf"\b{field}\b"):
        ModelConfig(**kwargs)


def test_config_head_dim_resolved():
    assert ModelConfig(d_model=64, n_heads=4, n_kv_heads=2).head_dim == 16
    assert ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=32).head_dim == 32


def test_from_name_unknown_lists_presets():
    with pytest.raises(TinyMixtralError) as e:
        ModelConfig.from_name("nope")
    msg = str(e.value)
    assert "nope" in msg
    for name in PRESETS:
        assert name in msg


def test_from_name_overrides():
    cfg = ModelConfig.from_name("demo", n_layers=2)
    assert cfg.n_layers == 2 and cfg.d_model == PRESETS["demo"]["d_model"]
    with pytest.raises(TinyMixtralError, match="n_layerz"):
        ModelConfig.from_name("demo", n_layerz=2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_dict_round_trip_presets(name):
    cfg = ModelConfig.from_name(name)
    d = cfg.to_hf_dict()
    assert d["model_type"] == cfg.model_type
    assert ModelConfig.from_hf_dict(d) == cfg


def test_hf_dict_round_trip_routing_options(tmp_path):
    cfg = ModelConfig.from_name("demo", router_aux_loss_coef=0.03, router_z_loss_coef=0.001,
                                router_jitter_noise=0.1, noisy_gating=True, capacity_factor=1.25)
    d = cfg.to_hf_dict()
    assert d["router_jitter_noise"] == 0.1 and d["capacity_factor"] == 1.25 and d["noisy_gating"] is True
    assert ModelConfig.from_hf_dict(d) == cfg
    cfg.save(tmp_path / "config.json")  # and through JSON on disk
    assert ModelConfig.load(tmp_path) == cfg
    # fields left at their defaults are not written, and still come back
    plain = ModelConfig.from_name("demo")
    assert "capacity_factor" not in plain.to_hf_dict() and "noisy_gating" not in plain.to_hf_dict()


def test_from_hf_dict_unknown_field():
    d = ModelConfig.from_name("demo").to_hf_dict()
    d["frobnicate_level"] = 3
    with pytest.raises(TinyMixtralError, match="frobnicate_level"):
        ModelConfig.from_hf_dict(d)


def test_from_hf_dict_rejects_llama():
    d = ModelConfig.from_name("demo").to_hf_dict()
    d["model_type"] = "llama"
    with pytest.raises(TinyMixtralError, match=re.escape("'llama'")):
        ModelConfig.from_hf_dict(d)
