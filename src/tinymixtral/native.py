"""Mistral's native layout (mistral-inference, the Hub's `consolidated.safetensors`), both ways.

A native directory holds `params.json` (dim, n_layers, head_dim, hidden_dim, n_heads, n_kv_heads,
norm_eps, vocab_size, rope_theta, sliding_window, and a `moe` block for Mixtral) and
`consolidated.safetensors` with Mistral's names (`layers.0.attention.wq.weight`,
`layers.0.feed_forward.experts.3.w1.weight`, ...). Its q and k rows pair rotary dimensions (2j, 2j+1)
of each head, where Hugging Face checkpoints pair (j, j + C/2) ("rotate half"); transformers' own
conversion script permutes them with `permute_for_rope`, and so do we, in both directions.

Reading presents the native file under HF names (`NativeFile`), so `load_model` streams it like any
HF checkpoint; writing renames and permutes what `convert.to_hf` gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import TinyMixtralError
from .tensorfile import SafetensorsFile

PARAMS = "params.json"
CONSOLIDATED = "consolidated.safetensors"

# native name -> HF name; {i} layer, {e} expert, {x} one of a few letters
NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attention.w{x}.weight": "model.layers.{i}.self_attn.{x}_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.gate.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "layers.{i}.feed_forward.experts.{e}.w{x}.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w{x}.weight",
}
_GROUPS = {"i": r"(?P<i>\d+)", "e": r"(?P<e>\d+)", "x": r"(?P<x>[a-z0-9])"}


def _rename(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        m = re.fullmatch(re.escape(src).replace(r"\{", "{").replace(r"\}", "}").format(**_GROUPS), name)
        if m:
            return dst.format(**m.groupdict())
    return None


def to_hf_name(native: str) -> str | None:
    return _rename(native, NAMES)


def to_native_name(hf: str) -> str | None:
    return _rename(hf, {v: k for k, v in NAMES.items()})


def rope_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k rows [n_heads * C, D] from interleaved pairs to rotate-half (transformers' permute_for_rope)."""
    rows, D = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, D).transpose(1, 2).reshape(rows, D)


def rope_to_native(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_to_hf."""
    rows, D = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, D).transpose(1, 2).reshape(rows, D)


# ---- params.json ----------------------------------------------------------------------------------
_KNOWN = {"dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size",
          "rope_theta", "sliding_window", "max_seq_len", "moe", "max_batch_size", "tied_embeddings"}


def config_from_params(p: dict, where: Path) -> ModelConfig:
    unknown = sorted(set(p) - _KNOWN)
    if unknown:
        raise TinyMixtralError(f"{where}: unknown field(s) {', '.join(unknown)} (not a Mistral text model this "
                               "version reads)")
    missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size") if k not in p]
    if missing:
        raise TinyMixtralError(f"{where}: missing field(s) {', '.join(missing)}")
    if p.get("tied_embeddings"):
        raise TinyMixtralError(f"{where}: tied embeddings are not supported in the native format")
    moe = p.get("moe") or {}
    if moe and not set(moe) <= {"num_experts", "num_experts_per_tok"}:
        raise TinyMixtralError(f"{where}: moe block has unsupported field(s) "
                               f"{', '.join(sorted(set(moe) - {'num_experts', 'num_experts_per_tok'}))}")
    window = p.get("sliding_window")
    return ModelConfig(
        vocab_size=p["vocab_size"], d_model=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads", p["n_heads"]), head_dim=p.get("head_dim"), d_ff=p["hidden_dim"],
        n_experts=moe.get("num_experts", 0), top_k=moe.get("num_experts_per_tok", 2) if moe else 2,
        sliding_window=int(window) if window is not None else None, max_seq_len=p.get("max_seq_len", 32768),
        rope_theta=float(p.get("rope_theta", 1e4)), norm_eps=p.get("norm_eps", 1e-5),
        router_aux_loss_coef=0.001 if moe else 0.0)  # as transformers' default for a Mixtral config


def params_from_config(cfg: ModelConfig) -> dict:
    p = {"dim": cfg.d_model, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim, "hidden_dim": cfg.d_ff,
         "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
         "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}
    if cfg.sliding_window is not None:
        p["sliding_window"] = cfg.sliding_window
    if cfg.is_moe:
        p["moe"] = {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k}
    return p


def read_params(path: Path) -> ModelConfig:
    try:
        p = json.loads((path / PARAMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyMixtralError(f"{path / PARAMS} is not valid JSON: {e}") from None
    if not isinstance(p, dict):
        raise TinyMixtralError(f"{path / PARAMS} must hold a JSON object")
    return config_from_params(p, path / PARAMS)


def check_writable(cfg: ModelConfig):
    """What the native format cannot say: refuse rather than write something that loads differently."""
    if cfg.tie_embeddings:
        raise TinyMixtralError("Mistral's native format has no tied LM head; convert an untied model or keep HF")
    if cfg.quantization or cfg.noisy_gating:
        raise TinyMixtralError("Mistral's native format holds plain full-precision Mistral/Mixtral weights: no "
                               "tinymixtral quantization or noisy-gating weights")


# ---- reading: a native file seen under HF names ---------------------------------------------------
class NativeFile:
    """consolidated.safetensors with HF key names, q/k permuted to rotate-half as they are read."""

    def __init__(self, path: Path, cfg: ModelConfig):
        self.file, self.cfg = SafetensorsFile(path), cfg
        self.names = {}
        for key in self.file.keys():
            hf = to_hf_name(key)
            if hf is None:
                raise TinyMixtralError(f"{path}: unexpected weight {key} (not a Mistral/Mixtral native name)")
            self.names[hf] = key

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(self.names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.file.dtype(self.names[name])

    def _heads(self, name: str) -> int | None:
        if name.endswith("self_attn.q_proj.weight"):
            return self.cfg.n_heads
        if name.endswith("self_attn.k_proj.weight"):
            return self.cfg.n_kv_heads
        return None

    def read(self, name: str) -> torch.Tensor:
        t = self.file.read(self.names[name])
        heads = self._heads(name)
        return t if heads is None else rope_to_hf(t, heads)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if self._heads(name) is None:
            return self.file.read_into(self.names[name], out)
        return out.copy_(self.read(name))


def native_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named tensors -> native names, q/k permuted back to interleaved pairs."""
    out = {}
    for name, t in hf.items():
        native = to_native_name(name)
        assert native is not None, f"{name} has no native name"
        if name.endswith("self_attn.q_proj.weight"):
            t = rope_to_native(t, cfg.n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            t = rope_to_native(t, cfg.n_kv_heads)
        out[native] = t.contiguous()
    return out
