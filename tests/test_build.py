"""build.py: skeleton(cfg) and build_model(cfg, state_dict), the one way every command builds a model."""

from __future__ import annotations

import pytest
import torch

from tinymixtral.build import build_model, skeleton
from tinymixtral.config import ModelConfig
from tinymixtral.errors import TinyMixtralError
from tinymixtral.model.quant import QuantExperts, QuantLinear
from tinymixtral.quantize import make_settings, quantize_state_dict

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, n_experts=4, top_k=2)


def state_of(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_model(cfg).state_dict().items()}


def test_skeleton_is_on_meta_and_quantized_when_the_config_says_so():
    plain = skeleton(CFG)
    assert all(p.is_meta for p in plain.parameters())
    q = make_settings(CFG, 8)
    quant = skeleton(CFG.replace(quantization=q))
    kinds = {type(m) for m in quant.modules()}
    assert QuantLinear in kinds and QuantExperts in kinds
    assert all(t.is_meta for t in quant.state_dict().values())
    assert type(quant.layers[0].ffn.router).__name__ == "Router"  # the router is never quantized


def test_build_model_uses_the_given_tensors():
    sd = state_of(CFG)
    model = build_model(CFG, sd)
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].data_ptr() == v.data_ptr(), f"{k} was copied"  # never held twice


def test_build_model_names_missing_and_unexpected_keys():
    sd = state_of(CFG)
    missing = dict(sd)
    missing.pop("layers.1.attn.wo.weight")
    with pytest.raises(TinyMixtralError, match=r"missing \['layers.1.attn.wo.weight'\]"):
        build_model(CFG, missing)
    extra = dict(sd, **{"layers.0.attn.bias": torch.zeros(3)})
    with pytest.raises(TinyMixtralError, match=r"unexpected \['layers.0.attn.bias'\]"):
        build_model(CFG, extra)


def test_optional_noise_weight_is_initialised_when_absent():
    cfg = CFG.replace(noisy_gating=True, init_std=0.05)
    sd = {k: v for k, v in state_of(cfg).items() if not k.endswith("router.noise.weight")}
    model = build_model(cfg, sd, dtype=torch.float64)
    w = model.layers[0].ffn.router.noise.weight
    assert not w.is_meta and w.dtype == torch.float64 and w.shape == (cfg.n_experts, cfg.d_model)
    assert 0.03 < w.std().item() < 0.07


def test_tied_head_reads_the_embedding_after_loading():
    cfg = CFG.replace(tie_embeddings=True)
    sd = state_of(cfg)
    assert "lm_head.weight" not in sd  # one tensor, one key
    model = build_model(cfg, sd)
    assert model.lm_head.weight is model.embed.weight
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids)
    with torch.no_grad():
        model.embed.weight[:, 0] += 1.0  # the head moves with the embedding: nothing to re-tie
    after = model(ids)
    assert not torch.allclose(before, after)
    assert model.num_params() == sum(v.numel() for v in sd.values())


def test_dtype_and_device():
    model = build_model(CFG, state_of(CFG), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_quantized_model_needs_weights():
    q = make_settings(CFG, 4, 32)
    with pytest.raises(TinyMixtralError, match="needs its weights"):
        build_model(CFG.replace(quantization=q))
    model = build_model(CFG.replace(quantization=q), quantize_state_dict(state_of(CFG), CFG, q))
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, CFG.vocab_size)
