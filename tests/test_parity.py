"""Numerical parity with transformers (the reference): fp32, CPU, tiny random configs, fixed seeds.

Both directions through real model directories (HF save_pretrained -> load_model, save_model -> HF
from_pretrained), transformers 5's fused expert layout, the load-balancing loss and config.json. (The in-memory
converter round trip is in test_convert.py.) Run with `-s` to see the max abs logit error of every case.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

import tinymixtral  # noqa: E402
from conftest import PARITY_CASES as CASES, classic_keys, randomize_, safetensors_keys, seeded_ids  # noqa: E402
from tinymixtral import ModelConfig, Transformer  # noqa: E402
from tinymixtral.model.moe import load_balancing_loss  # noqa: E402

transformers.utils.logging.disable_progress_bar()
ATOL = 1e-4

MOE_CASES = [name for name, (cfg, *_) in CASES.items() if cfg.is_moe]
WINDOW_CASES = [name for name, (cfg, *_) in CASES.items() if cfg.sliding_window is not None]


# ---- helpers ----------------------------------------------------------------------------------------
def hf_model(cfg: ModelConfig, attn: str, seed: int = 0):
    """A random transformers model of this config (eval mode)."""
    d = cfg.to_hf_dict()
    if cfg.is_moe:
        model = MixtralForCausalLM(MixtralConfig(**d, attn_implementation=attn))
    else:
        model = MistralForCausalLM(MistralConfig(**d, attn_implementation=attn))
    assert model.config._attn_implementation == attn
    return randomize_(model, seed).eval()


def report(case: str, direction: str, err: float):
    print(f"\n[parity] {case:<28} {direction:<16} max|dlogits| = {err:.3e}")


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


# ---- 1. theirs -> ours -----------------------------------------------------------------------------
@torch.no_grad()
def test_hf_save_pretrained_loads_with_equal_logits(case, tmp_path):
    cfg, attn, B, S = CASES[case]
    hf = hf_model(cfg, attn)
    hf.save_pretrained(tmp_path)
    assert set(safetensors_keys(tmp_path)) == classic_keys(cfg)  # what transformers writes: the classic layout

    ours = tinymixtral.load_model(tmp_path)
    assert ours.cfg == cfg
    if cfg.tie_embeddings:
        assert ours.lm_head.weight is ours.embed.weight
    x = seeded_ids(B, S, cfg.vocab_size, seed=1)
    want, got = hf(x).logits, ours(x)
    assert want.abs().max() > 1.0  # not a near-zero model where any error hides
    err = (got - want).abs().max().item()
    report(case, "theirs->ours", err)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", WINDOW_CASES)
@torch.no_grad()
def test_sliding_window_matters(case, tmp_path):
    """Same weights without the window give different logits, on both sides: the window is really applied."""
    cfg, attn, B, S = CASES[case]
    assert S >= 3 * cfg.sliding_window
    hf = hf_model(cfg, attn)
    hf.save_pretrained(tmp_path)
    ours = tinymixtral.load_model(tmp_path)
    full_cfg = cfg.replace(sliding_window=None)
    ours_full = Transformer(full_cfg).eval()
    ours_full.load_state_dict(ours.state_dict())
    hf_full = hf_model(full_cfg, attn, seed=123)
    hf_full.load_state_dict(hf.state_dict())

    x = seeded_ids(B, S, cfg.vocab_size, seed=1)
    windowed, full = ours(x), ours_full(x)
    torch.testing.assert_close(windowed, hf(x).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(full, hf_full(x).logits, atol=ATOL, rtol=0)
    # Positions inside the window see the same keys; later ones must not.
    w = cfg.sliding_window
    torch.testing.assert_close(windowed[:, :w], full[:, :w], atol=ATOL, rtol=0)
    assert (windowed[:, w:] - full[:, w:]).abs().max() > 1e-2


# ---- 2. ours -> theirs -----------------------------------------------------------------------------
@torch.no_grad()
def test_save_model_loads_in_transformers_with_equal_logits(case, tmp_path):
    cfg, attn, B, S = CASES[case]
    torch.manual_seed(0)
    ours = randomize_(Transformer(cfg), seed=7).eval()
    tinymixtral.save_model(ours, tmp_path / "m")

    keys = set(safetensors_keys(tmp_path / "m"))
    assert keys == classic_keys(cfg)
    assert not any(bad in k for k in keys for bad in ("gate_up_proj", "mlp.experts", "mlp.gate.", "<native>"))
    if cfg.is_moe:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys
        assert not any(k.startswith("model.layers.0.mlp.") for k in keys)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation=attn).eval()
    assert type(hf) is (MixtralForCausalLM if cfg.is_moe else MistralForCausalLM)
    assert hf.config.sliding_window == cfg.sliding_window
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = seeded_ids(B, S, cfg.vocab_size, seed=1)
    want, got = hf(x).logits, ours(x)
    assert want.abs().max() > 1.0
    err = (got - want).abs().max().item()
    report(case, "ours->theirs", err)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ---- 4. transformers 5's fused in-memory layout on disk -------------------------------------------
@pytest.mark.parametrize("case", MOE_CASES)
@torch.no_grad()
def test_fused_expert_layout_loads(case, tmp_path):
    cfg, attn, B, S = CASES[case]
    hf = hf_model(cfg, attn, seed=5)
    sd = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd and "model.layers.0.mlp.gate.weight" in sd
    if cfg.tie_embeddings:  # safetensors refuses shared tensors; tied checkpoints omit the head
        sd.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.save_pretrained(tmp_path)
    assert any("gate_up_proj" in k for k in set(safetensors_keys(tmp_path)))

    ours = tinymixtral.load_model(tmp_path)
    x = seeded_ids(B, S, cfg.vocab_size, seed=1)
    want, got = hf(x).logits, ours(x)
    err = (got - want).abs().max().item()
    report(case, "fused->ours", err)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the fused tensors are taken as they are: same layout as ours
    torch.testing.assert_close(ours.layers[1].ffn.experts.w13, sd["model.layers.1.mlp.experts.gate_up_proj"], atol=0, rtol=0)
    torch.testing.assert_close(ours.layers[1].ffn.experts.w2, sd["model.layers.1.mlp.experts.down_proj"], atol=0, rtol=0)


# ---- 5. load-balancing loss ------------------------------------------------------------------------
@pytest.mark.parametrize("case", MOE_CASES)
@torch.no_grad()
def test_load_balancing_loss_matches_transformers(case, tmp_path):
    cfg, attn, B, S = CASES[case]
    assert cfg.router_aux_loss_coef > 0
    hf = hf_model(cfg, attn, seed=11)
    hf.save_pretrained(tmp_path)
    ours = tinymixtral.load_model(tmp_path)
    x = seeded_ids(B, S, cfg.vocab_size, seed=4)

    out = hf(x, output_router_logits=True)
    ours(x)
    routing = ours.routing()
    assert len(routing) == len(out.router_logits) == cfg.n_layers
    logits = [r.logits_NE for r in routing]
    for mine, theirs in zip(logits, out.router_logits):
        assert mine.shape == (B * S, cfg.n_experts) and mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs.float(), atol=ATOL, rtol=0)
    for r in routing:  # every token took top_k distinct experts with weights summing to one
        assert r.experts_NK.shape == (B * S, cfg.top_k)
        torch.testing.assert_close(r.weights_NK.sum(-1), torch.ones(B * S))

    want = load_balancing_loss_func(tuple(out.router_logits), cfg.n_experts, cfg.top_k)
    got = load_balancing_loss(logits, cfg.top_k)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, out.aux_loss, atol=1e-6, rtol=1e-5)
    # same function of the same logits: the reference on our logits agrees too
    torch.testing.assert_close(got, load_balancing_loss_func(tuple(logits), cfg.n_experts, cfg.top_k), atol=1e-6, rtol=1e-5)
    assert cfg.top_k * 0.99 < got.item() < cfg.n_experts  # between balanced (K) and fully collapsed (E)

    losses = ours.router_losses()
    assert set(losses) == {"aux_loss"}
    torch.testing.assert_close(losses["aux_loss"], cfg.router_aux_loss_coef * got, atol=1e-7, rtol=1e-6)


def test_config_json_matches_transformers(case):
    """Our config.json and the one transformers writes for the same config mean the same model."""
    cfg, attn, *_ = CASES[case]
    hf = hf_model(cfg, attn)
    theirs = json.loads(hf.config.to_json_string())
    assert ModelConfig.from_hf_dict(theirs) == cfg
