"""The HF <-> native weight map (tinymixtral.convert): bit-exact round trips, and checkpoints whose weights do not
fit the config (wrong shape, missing, unexpected) fail naming the key as it is in the file."""

from __future__ import annotations

import re

import pytest
import torch

import tinymixtral
from conftest import PARITY_CASES, classic_keys, edit_config, randomize_, rewrite_weights
from tinymixtral import TinyMixtralError, Transformer
from tinymixtral.convert import from_hf, to_hf


# ---- round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_convert_round_trip_is_bit_exact(case):
    cfg = PARITY_CASES[case][0]
    ours = randomize_(Transformer(cfg), seed=3)
    sd = ours.state_dict()
    hf_sd = to_hf(sd, cfg)
    assert set(hf_sd) == classic_keys(cfg)
    back = from_hf(hf_sd, cfg)
    expected = set(sd) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    assert set(back) == expected
    for k in expected:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    # and HF -> ours -> HF too
    again = to_hf(back, cfg)
    assert set(again) == set(hf_sd) and all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)


# ---- weights that do not fit the config (on the `saved` MoE directory: vocab 67, d_model 32, d_ff 40) -----
def test_weights_of_the_wrong_shape(saved):
    path, _ = saved
    edit_config(path, lambda d: d.update(hidden_size=48))  # head_dim is explicit, so the config stays valid
    with pytest.raises(TinyMixtralError, match=r"model\.embed_tokens\.weight has shape \(67, 32\).*\(67, 48\)"):
        tinymixtral.load_model(path)


@pytest.mark.parametrize("key,shape", [
    ("model.layers.1.block_sparse_moe.experts.2.w1.weight", (39, 32)),  # one expert of a stacked group
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", (32, 41)),
    ("model.layers.0.self_attn.k_proj.weight", (16, 31)),  # one of the fused q/k/v
    ("model.layers.1.block_sparse_moe.gate.weight", (5, 32)),
])
def test_one_misshapen_weight_is_named(saved, key, shape):
    path, _ = saved
    rewrite_weights(path, lambda sd: sd.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(TinyMixtralError, match=re.escape(f"{key} has shape {shape}")):
        tinymixtral.load_model(path)


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight",
                                 "model.layers.0.block_sparse_moe.experts.3.w3.weight",
                                 "lm_head.weight", "model.norm.weight"])
def test_missing_weight_is_named(saved, key):
    path, _ = saved
    rewrite_weights(path, lambda sd: sd.pop(key))
    with pytest.raises(TinyMixtralError, match=rf"missing 1 weight\(s\): {re.escape(key)}$"):
        tinymixtral.load_model(path)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_norm.weight", "model.layers.2.input_layernorm.weight",
                                 "model.layers.0.block_sparse_moe.experts.4.w1.weight"])
def test_unexpected_weight_is_named(saved, key):
    path, _ = saved
    rewrite_weights(path, lambda sd: sd.__setitem__(key, torch.zeros(32)))
    with pytest.raises(TinyMixtralError, match=rf"unexpected weight\(s\): {re.escape(key)}$"):
        tinymixtral.load_model(path)


def test_misshapen_fused_expert_weight_is_named_as_in_the_file(saved):
    """transformers 5's fused layout (mlp.experts.gate_up_proj): a bad tensor is named by its key in the file."""
    path, model = saved
    ours = model.layers[0].ffn

    def to_fused(sd):
        for k in [k for k in sd if k.startswith("model.layers.0.block_sparse_moe.")]:
            sd.pop(k)
        sd["model.layers.0.mlp.gate.weight"] = ours.router.weight.detach().clone()
        sd["model.layers.0.mlp.experts.down_proj"] = ours.experts.w2.detach().clone()
        sd["model.layers.0.mlp.experts.gate_up_proj"] = ours.experts.w13.detach()[:, :-2].clone()  # [4, 78, 32]

    rewrite_weights(path, to_fused)
    with pytest.raises(TinyMixtralError, match=re.escape("model.layers.0.mlp.experts.gate_up_proj has shape (4, 78, 32)")):
        tinymixtral.load_model(path)
