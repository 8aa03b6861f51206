"""ModelConfig: validation of impossible values, presets, and the HF config.json mapping."""

from __future__ import annotations

import re

import pytest

from conftest import tiny_cfg
from tinymixtral.config import PRESETS, ModelConfig
from tinymixtral.errors import TinyMixtralError

QCFG = tiny_cfg(vocab_size=100)  # the quantize tests' model (untied head: it gets quantized too)


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


def test_config_round_trips_quantization(tmp_path):
    q = {"method": "tinymixtral-weight-only", "bits": 8, "group_size": None, "skip": ["embed", "norm", "router"]}
    cfg = QCFG.replace(quantization=q)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert "quantization" not in QCFG.to_hf_dict()
    for bad in ({**q, "bits": 3}, {**q, "skip": ["embed"]}, {**q, "method": "gptq"}, {**q, "group_size": 32}):
        with pytest.raises(TinyMixtralError, match="quantization"):
            QCFG.replace(quantization=bad)
    with pytest.raises(TinyMixtralError, match="lm_head"):  # a tied head is the embedding: it stays fp
        QCFG.replace(tie_embeddings=True, quantization=q)
