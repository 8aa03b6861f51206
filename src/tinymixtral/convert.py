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


def hf_layout(hf_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> dict[str, list[tuple[str, tuple]]]:
    """Where each HF tensor goes: native key -> [(HF key, index of its block in the native tensor)].

    The index is () for a whole tensor, (rows,) for a block of a fused projection, (e, rows) for one
    expert's block of a stacked weight. Missing, unexpected or misshapen HF tensors raise
    TinyMixtralError naming them, before any tensor is read.
    """
    hf = dict(hf_shapes)
    source: dict[str, str] = {}  # native key -> the fused HF key it is read from whole
    for pattern, native in HF_FUSED_ALIASES.items():
        rx = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")
        for key in [k for k in hf if rx.match(k)]:
            source[native.format(i=rx.match(key).group(1))] = key
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tools write a tied head too: it is the embedding, not a weight of ours
    shapes = expected_shapes(cfg)
    layout, missing, misshapen = {}, [], []
    for native, shape in shapes.items():
        if native in source:
            key = source[native]
            if tuple(hf.pop(key)) != shape:
                misshapen.append(f"{key} has shape {tuple(hf_shapes[key])} but the config needs {shape}")
            layout[native] = [(key, ())]
            continue
        names = _names(_template(native))
        stacked = "{e}" in str(_template(native))
        parts, row = [], 0
        for j, name in enumerate(names):
            name = name.format(i=_layer_of(native), e="{e}")
            want = _part_shape(native, j, len(names), shape, cfg)
            keys = [name.format(e=e) for e in range(cfg.n_experts)] if stacked else [name]
            for e, key in enumerate(keys):
                if key not in hf:
                    missing.append(key)
                    continue
                got = tuple(hf.pop(key))
                if got != want:
                    misshapen.append(f"{key} has shape {got} but the config needs {want}")
                rows = slice(row, row + want[0])
                parts.append((key, (e, rows) if stacked else (rows,) if len(names) > 1 else ()))
            row += want[0]
        layout[native] = parts
    # Ours only (noisy gating): absent from plain HF checkpoints; build_model initialises it.
    for native in [n for n in layout if n.endswith(".router.noise.weight")]:
        if not layout[native]:
            del layout[native]
    missing = [m for m in missing if "gate_noise" not in m]
    if missing:
        raise TinyMixtralError(f"checkpoint is missing {len(missing)} weight(s): {_short(missing)}")
    unexpected = [k for k in hf if "rotary_emb" not in k]
    if unexpected:
        raise TinyMixtralError(f"checkpoint has {len(unexpected)} unexpected weight(s): {_short(unexpected)}")
    if misshapen:
        raise TinyMixtralError(f"{len(misshapen)} weight(s) do not fit config.json: {_short(misshapen, 3)}")
    return layout


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> ours (a tensor read whole is kept as it is; blocks are copied into their place)."""
    shapes = expected_shapes(cfg)
    out = {}
    for native, parts in hf_layout({k: tuple(t.shape) for k, t in hf.items()}, cfg).items():
        if len(parts) == 1 and parts[0][1] == ():
            out[native] = hf[parts[0][0]]
            continue
        out[native] = torch.empty(shapes[native], dtype=hf[parts[0][0]].dtype)
        for key, index in parts:
            out[native][index] = hf[key]
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
