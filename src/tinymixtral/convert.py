"""Hugging Face state dict <-> ours: one declarative key map, inverted for the other direction.

Each native key names the HF key(s) it is made from. A tuple means the HF tensors are concatenated
along dim 0 (our fused projections); `{e}` means one HF tensor per expert, stacked along a new dim 0.
transformers >= 5 (and tools such as mergekit) may also write experts fused; `HF_FUSED_ALIASES`
maps those names onto ours directly.

A quantized model (`tinymixtral quantize`) keeps the same names for its integer weights, and puts each
one's `scales` / `zeros` beside it: native `layers.0.attn.wo.scales` or `layers.0.ffn.experts.w13_scales`
<-> HF `model.layers.0.self_attn.o_proj.scales` or `...experts.{e}.w1.scales` (split/stacked like the weight).
"""

from __future__ import annotations

import re

import torch

from .build import skeleton
from .config import ModelConfig
from .errors import TinyMixtralError

L = "model.layers.{i}"
KEY_MAP: dict[str, str | tuple[str, ...]] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": f"{L}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": f"{L}.post_attention_layernorm.weight",
    "layers.{i}.attn.wqkv.weight": (f"{L}.self_attn.q_proj.weight", f"{L}.self_attn.k_proj.weight",
                                    f"{L}.self_attn.v_proj.weight"),
    "layers.{i}.attn.wo.weight": f"{L}.self_attn.o_proj.weight",
    # Mixtral (MoE)
    "layers.{i}.ffn.router.weight": f"{L}.block_sparse_moe.gate.weight",
    "layers.{i}.ffn.router.noise.weight": f"{L}.block_sparse_moe.gate_noise.weight",  # ours: noisy gating
    "layers.{i}.ffn.experts.w13": (f"{L}.block_sparse_moe.experts.{{e}}.w1.weight",
                                   f"{L}.block_sparse_moe.experts.{{e}}.w3.weight"),
    "layers.{i}.ffn.experts.w2": f"{L}.block_sparse_moe.experts.{{e}}.w2.weight",
    # Mistral (dense)
    "layers.{i}.ffn.w13.weight": (f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"),
    "layers.{i}.ffn.w2.weight": f"{L}.mlp.down_proj.weight",
}
# transformers >= 5 in-memory names, which some tools write to disk. Same layout as ours.
HF_FUSED_ALIASES = {
    f"{L}.mlp.gate.weight": "layers.{i}.ffn.router.weight",
    f"{L}.mlp.experts.gate_up_proj": "layers.{i}.ffn.experts.w13",
    f"{L}.mlp.experts.down_proj": "layers.{i}.ffn.experts.w2",
}


QUANT_SUFFIXES = ("scales", "zeros")


def _names(template: str | tuple[str, ...]) -> tuple[str, ...]:
    return template if isinstance(template, tuple) else (template,)


def _split_quant(native: str) -> tuple[str, str | None]:
    """(the weight's native key, 'scales'/'zeros') for a quantized weight's companion; (native, None) otherwise."""
    for suffix in QUANT_SUFFIXES:
        if native.endswith("." + suffix):
            return native.removesuffix(suffix) + "weight", suffix
        if native.endswith("_" + suffix):
            return native.removesuffix("_" + suffix), suffix
    return native, None


def _template(native: str) -> str | tuple[str, ...]:
    """The HF name template(s) of a native key (a companion's sit beside its weight's)."""
    base, suffix = _split_quant(native)
    template = KEY_MAP[_template_of(base)]
    if suffix is None:
        return template
    names = tuple(n.removesuffix("weight") + suffix for n in _names(template))
    return names if isinstance(template, tuple) else names[0]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Native key -> shape, for every tensor a model of this config has."""
    return {k: tuple(v.shape) for k, v in skeleton(cfg).state_dict().items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> ours. Missing, unexpected or misshapen keys raise TinyMixtralError naming them."""
    hf = dict(hf)
    source: dict[str, str] = {}  # native key -> the fused HF key it was read from (for messages)
    for pattern, native in HF_FUSED_ALIASES.items():  # fused layout: rename to a private key first
        rx = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")
        for key in [k for k in hf if rx.match(k)]:
            source[native.format(i=rx.match(key).group(1))] = key
            hf["<native>" + native.format(i=rx.match(key).group(1))] = hf.pop(key)
    shapes = expected_shapes(cfg)
    out, missing, misshapen = {}, [], []
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tools write a tied head too: it is the embedding, not a weight of ours
    for native in shapes:
        if "<native>" + native in hf:
            out[native] = hf.pop("<native>" + native)
            continue
        template = _template(native)
        i = _layer_of(native)
        parts = []
        for j, name in enumerate(_names(template)):
            name = name.format(i=i, e="{e}")
            # Check each HF tensor before stacking/concatenating them, so a bad one is named (not a torch error).
            want = _part_shape(native, j, len(_names(template)), shapes[native], cfg)
            keys = [name.format(e=e) for e in range(cfg.n_experts)] if "{e}" in name else [name]
            missing += [k for k in keys if k not in hf]
            if all(k in hf for k in keys):
                tensors = [hf.pop(k) for k in keys]
                bad = [(k, tuple(t.shape)) for k, t in zip(keys, tensors) if tuple(t.shape) != want]
                misshapen += [f"{k} has shape {shape} but the config needs {want}" for k, shape in bad]
                if not bad:
                    parts.append(torch.stack(tensors) if "{e}" in name else tensors[0])
        if len(parts) == len(_names(template)):
            out[native] = torch.cat(parts, dim=-2 if "{e}" in str(template) else 0)
    # Ours only (noisy gating): absent from plain HF checkpoints; keep the fresh initialisation.
    missing = [m for m in missing if "gate_noise" not in m]
    if missing:
        raise TinyMixtralError(f"checkpoint is missing {len(missing)} weight(s): {_short(missing)}")
    unexpected = [source.get(k.removeprefix("<native>"), k) for k in hf if "rotary_emb" not in k]
    if unexpected:
        raise TinyMixtralError(f"checkpoint has {len(unexpected)} unexpected weight(s): {_short(unexpected)}")
    misshapen += [f"{source.get(k, k)} has shape {tuple(v.shape)} but the config needs {shapes[k]}"
                  for k, v in out.items() if tuple(v.shape) != shapes[k]]
    if misshapen:
        raise TinyMixtralError(f"{len(misshapen)} weight(s) do not fit config.json: {_short(misshapen, 3)}")
    return out


def _part_shape(native: str, j: int, n_parts: int, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of the j-th of the n_parts HF tensors (per expert, for expert weights) that make native key `native`."""
    if "{e}" in str(_template(native)):
        return (shape[1] // n_parts, *shape[2:])  # [E, n*R, C] -> [R, C] per expert
    sizes = _split_sizes(native, cfg) or [shape[0]]
    return (sizes[j], *shape[1:])


def to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Ours -> HF state dict in the classic on-disk layout (per-expert w1/w2/w3, separate q/k/v)."""
    out = {}
    for native, t in sd.items():  # a tied head has no key of its own: transformers ties it back itself
        template = _template(native)
        names = [n.format(i=_layer_of(native), e="{e}") for n in _names(template)]
        if "{e}" in str(template):
            pieces = t.chunk(len(names), dim=-2)  # w13: [E, 2F, D] -> w1 [E, F, D], w3 [E, F, D]
            for name, piece in zip(names, pieces):
                for e in range(piece.shape[0]):
                    out[name.format(e=e)] = piece[e].contiguous()
        else:
            sizes = _split_sizes(native, cfg) or [t.shape[0]]
            for name, piece in zip(names, t.split(sizes, dim=0)):
                out[name] = piece.contiguous()
    return out


def _split_sizes(native: str, cfg: ModelConfig) -> list[int]:
    native = _split_quant(native)[0]  # scales/zeros split by rows like their weight
    if native.endswith("attn.wqkv.weight"):
        return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    if native.endswith("ffn.w13.weight"):
        return [cfg.d_ff, cfg.d_ff]
    return []  # one piece: the whole tensor


_LAYER_RX = re.compile(r"^layers\.(\d+)\.")


def _template_of(native: str) -> str:
    return _LAYER_RX.sub("layers.{i}.", native)


def _layer_of(native: str) -> int | None:
    m = _LAYER_RX.match(native)
    return int(m.group(1)) if m else None


def _short(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
