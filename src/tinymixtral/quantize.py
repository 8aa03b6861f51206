"""Offline weight-only int8 / int4 quantization: a full-precision state dict (or model) in, a quantized one out.

The schemes, the quantized modules and the module swap are in model/quant.py; this module picks the
settings (written to config.json as "quantization") and quantizes the tensors that model/quant.py's
`targets` names. Router, embeddings and norms stay in full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from .build import build_model, skeleton
from .config import QUANT_METHOD, ModelConfig
from .errors import TinyMixtralError
from .model.cpu_kernels import GROUP_SIZES
from .model.moe import Experts
from .model.quant import quantize, targets


def make_settings(cfg: ModelConfig, bits: int, group_size: int | None = None, skip=()) -> dict:
    """The config.json "quantization" block for quantizing a model of `cfg` (validates bits and group size)."""
    if cfg.quantization:
        raise TinyMixtralError(f"the model is already quantized ({cfg.quantization['bits']}-bit); quantize the "
                               "full-precision model instead")
    if bits not in (8, 4):
        raise TinyMixtralError(f"--bits must be 8 or 4, got {bits}")
    if bits == 8 and group_size is not None:
        raise TinyMixtralError("--group-size is for --bits 4 only (int8 uses one scale per output channel)")
    if bits == 4:
        group_size = 32 if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise TinyMixtralError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    skip = sorted({"router", "embed", "norm", *skip, *(["lm_head"] if cfg.tie_embeddings else [])})
    return {"method": QUANT_METHOD, "bits": bits, "group_size": group_size, "skip": skip}


def quantized_keys(cfg: ModelConfig, q: dict) -> dict[str, str]:
    """Weight key -> prefix of its companions (".scales" / "_scales") for every tensor `q` quantizes.

    Refuses a group size that does not divide a quantized weight's input dim, before any work is done.
    """
    model = skeleton(cfg)
    keys, shapes = {}, {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, m in targets(model, q).items():
        keys.update({f"{name}.w13": f"{name}.w13_", f"{name}.w2": f"{name}.w2_"} if isinstance(m, Experts)
                    else {f"{name}.weight": f"{name}."})
    for key in keys:
        K = shapes[key][-1]
        if q["group_size"] and K % q["group_size"]:
            raise TinyMixtralError(f"--group-size {q['group_size']} does not divide the input dim {K} of {key} "
                                   f"{shapes[key]}; choose a group size that divides it")
    return keys


def quantize_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, q: dict) -> dict[str, torch.Tensor]:
    """Offline: a full-precision state dict (native keys) -> the quantized one for `q` (other tensors copied)."""
    keys = quantized_keys(cfg, q)
    out = {}
    for key, t in sd.items():
        if key in keys:
            parts = quantize(t, q["bits"], q["group_size"])
            out[key] = parts.pop("weight")
            out.update({keys[key] + what: v for what, v in parts.items()})
        else:
            out[key] = t.detach().clone()
    return out


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, skip=()) -> nn.Module:
    """A new, quantized copy of a Transformer (the input is left as it is)."""
    q = make_settings(model.cfg, bits, group_size, skip)
    qsd = quantize_state_dict(model.state_dict(), model.cfg, q)
    return build_model(model.cfg.replace(quantization=q), qsd).train(model.training)
