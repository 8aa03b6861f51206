"""Mistral's native format (params.json + consolidated.safetensors): reading, writing, `convert`, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinymixtral
from conftest import assert_one_line_error, randomize_, run_cli, seeded_ids, tiny_cfg, tiny_model
from tinymixtral import TinyMixtralError
from tinymixtral.checkpoint import load_model, save_model

transformers = pytest.importorskip("transformers")
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

CASES = {
    "mixtral-swa": tiny_cfg(vocab_size=67, d_ff=40, sliding_window=8, rope_theta=1e6),
    "mixtral-hd16-top3": tiny_cfg(vocab_size=67, d_model=48, head_dim=16, n_kv_heads=1, n_experts=5, top_k=3,
                                  sliding_window=None),
    "mistral": tiny_cfg(vocab_size=67, n_experts=0, d_ff=72, sliding_window=6),
}


def permute_for_rope(w, n_heads, dim1, dim2):
    """transformers' convert_mistral_weights_to_hf.py: native (interleaved pairs) -> HF (rotate half)."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def unpermute_for_rope(w, n_heads, dim1, dim2):
    """Its inverse, written here independently of tinymixtral.native."""
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def native_dir_from_transformers(hf, cfg, out):
    """What mistral-inference ships, made from a transformers model: Mistral's names, interleaved q/k rows."""
    out.mkdir()
    sd, native = hf.state_dict(), {}
    hf_keys = {k for k in sd if "rotary" not in k}
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.n_layers):
        L = f"model.layers.{i}."
        names.update({L + "input_layernorm.weight": f"layers.{i}.attention_norm.weight",
                      L + "post_attention_layernorm.weight": f"layers.{i}.ffn_norm.weight"})
        for x in "qkvo":
            names[L + f"self_attn.{x}_proj.weight"] = f"layers.{i}.attention.w{x}.weight"
        if cfg.is_moe:
            names[L + "block_sparse_moe.gate.weight"] = f"layers.{i}.feed_forward.gate.weight"
            for e in range(cfg.n_experts):
                for w in ("w1", "w2", "w3"):
                    names[L + f"block_sparse_moe.experts.{e}.{w}.weight"] = f"layers.{i}.feed_forward.experts.{e}.{w}.weight"
        else:
            for hf_name, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                names[L + f"mlp.{hf_name}.weight"] = f"layers.{i}.feed_forward.{w}.weight"
    # transformers 5 keeps experts fused in memory: unfuse them into the classic per-expert tensors first
    classic = {}
    for k, t in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            L = k.removesuffix("mlp.experts.gate_up_proj")
            for e in range(cfg.n_experts):
                classic[L + f"block_sparse_moe.experts.{e}.w1.weight"], classic[L + f"block_sparse_moe.experts.{e}.w3.weight"] = t[e].chunk(2)
        elif k.endswith("mlp.experts.down_proj"):
            L = k.removesuffix("mlp.experts.down_proj")
            for e in range(cfg.n_experts):
                classic[L + f"block_sparse_moe.experts.{e}.w2.weight"] = t[e]
        elif k.endswith("mlp.gate.weight") and cfg.is_moe:
            classic[k.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = t
        elif k in hf_keys:
            classic[k] = t
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for k, t in classic.items():
        if k.endswith("q_proj.weight"):
            t = unpermute_for_rope(t, cfg.n_heads, q_rows, cfg.d_model)
        elif k.endswith("k_proj.weight"):
            t = unpermute_for_rope(t, cfg.n_kv_heads, kv_rows, cfg.d_model)
        native[names[k]] = t.contiguous()
    assert set(native) == set(names.values())
    save_file(native, out / "consolidated.safetensors")
    params = {"dim": cfg.d_model, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim, "hidden_dim": cfg.d_ff,
              "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps,
              "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta}
    if cfg.sliding_window:
        params["sliding_window"] = cfg.sliding_window
    if cfg.is_moe:
        params["moe"] = {"num_experts_per_tok": cfg.top_k, "num_experts": cfg.n_experts}
    (out / "params.json").write_text(json.dumps(params))
    return out


def test_rope_permutation_matches_transformers_script():
    from tinymixtral.native import rope_to_hf, rope_to_native

    w = torch.randn(4 * 8, 32)
    torch.testing.assert_close(rope_to_hf(w, 4), permute_for_rope(w, 4, 32, 32), rtol=0, atol=0)
    torch.testing.assert_close(rope_to_native(rope_to_hf(w, 4), 4), w, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_native_checkpoint_gives_transformers_logits(name, tmp_path):
    cfg = CASES[name]
    d = cfg.to_hf_dict()
    hf = (MixtralForCausalLM(MixtralConfig(**d)) if cfg.is_moe else MistralForCausalLM(MistralConfig(**d)))
    hf = randomize_(hf, 0).eval()
    ours = load_model(native_dir_from_transformers(hf, cfg, tmp_path / "native"))
    for f in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_experts", "sliding_window"):
        assert getattr(ours.cfg, f) == getattr(cfg, f), f
    if cfg.is_moe:
        assert ours.cfg.top_k == cfg.top_k
    x = seeded_ids(2, 20, cfg.vocab_size, seed=1)
    want = hf(x).logits
    assert want.abs().max() > 1.0
    torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_to_mistral_to_hf_is_bit_exact(name, tmp_path):
    cfg = CASES[name].replace(router_aux_loss_coef=0.001 if CASES[name].is_moe else 0.0)  # params.json has none
    save_model(tiny_model(cfg, vary_norms=True), tmp_path / "hf")
    for src, to, dst in (("hf", "mistral", "native"), ("native", "hf", "back")):
        r = run_cli("convert", "--model", tmp_path / src, "--to", to, "--out", tmp_path / dst)
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == ["consolidated.safetensors", "params.json"]
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(tmp_path / "back").cfg == load_model(tmp_path / "hf").cfg
    native = load_file(tmp_path / "native" / "consolidated.safetensors")
    assert "layers.0.attention.wq.weight" in native and "tok_embeddings.weight" in native
    assert not torch.equal(native["layers.0.attention.wq.weight"], a["model.layers.0.self_attn.q_proj.weight"])


def test_native_written_by_save_model_loads_with_equal_logits(tmp_path):
    model = tiny_model(CASES["mixtral-swa"], vary_norms=True)
    save_model(model, tmp_path / "n", format="mistral")
    back = load_model(tmp_path / "n", bits=8)  # streamed and quantized on the way in, like an HF directory
    assert back.cfg.quantization["bits"] == 8
    x = seeded_ids(2, 12, 67)
    torch.testing.assert_close(load_model(tmp_path / "n")(x), model(x), atol=0, rtol=0)


def test_writing_native_refuses_what_it_cannot_say(tmp_path):
    with pytest.raises(TinyMixtralError, match="no tied LM head"):
        save_model(tiny_model(CASES["mistral"].replace(tie_embeddings=True)), tmp_path / "t", format="mistral")
    assert not (tmp_path / "t").exists()


def _native(tmp_path, edit_params=None, extra=()):
    save_model(tiny_model(CASES["mistral"]), tmp_path / "n", format="mistral")
    if edit_params:
        p = json.loads((tmp_path / "n" / "params.json").read_text())
        edit_params(p)
        (tmp_path / "n" / "params.json").write_text(json.dumps(p))
    for name in extra:
        (tmp_path / "n" / name).write_bytes(b"\x80\x04K\x01.")
    return tmp_path / "n"


@pytest.mark.parametrize("case,message", [
    ("unknown", "unknown field(s) vision_encoder"),
    ("missing", "missing field(s) dim"),
    ("mixed", "mixes formats"),
    ("pickle", "never unpickles"),
    ("bad_json", "is not valid JSON"),
])
def test_bad_native_directories_get_one_line(case, message, tmp_path):
    if case == "unknown":
        d = _native(tmp_path, lambda p: p.update(vision_encoder={}))
    elif case == "missing":
        d = _native(tmp_path, lambda p: p.pop("dim"))
    elif case == "mixed":
        d = _native(tmp_path)
        (d / "consolidated.safetensors").rename(d / "model.safetensors")
    elif case == "pickle":
        d = _native(tmp_path, extra=["consolidated.00.pth"])
        (d / "consolidated.safetensors").unlink()
    else:
        d = _native(tmp_path)
        (d / "params.json").write_text("{not json")
    r = run_cli("convert", "--model", d, "--to", "hf", "--out", tmp_path / "out")
    assert message in assert_one_line_error(r, "convert", returncode=2)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TinyMixtralError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tinymixtral.load_model(d)
