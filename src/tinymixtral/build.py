"""The one way to build a model: `skeleton(cfg)` (no memory) and `build_model(cfg, state_dict)`.

Loading a checkpoint, quantizing, merging, upcycling, resuming and gathering an FSDP model all come
through here, as gpt-fast's `_load_model` and mlx-lm's `load_model` are their projects' single path.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import TinyMixtralError
from .model.quant import swap_modules
from .model.transformer import Transformer

# Weights of ours that Hugging Face files do not have: a file without them gets them freshly initialised.
OPTIONAL = (".router.noise.weight",)  # noisy gating's noise projection


def pick_device(name: str | None) -> str:
    """The device `name` (a --device value), checked: one torch knows and this machine has. None: cuda when
    available, else cpu."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TinyMixtralError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from None
    have = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "mps": int(torch.backends.mps.is_available())}.get(dev.type, 0)
    if have == 0 or (dev.index or 0) >= have:
        raise TinyMixtralError(f"device {name!r} is not available here"
                               + ("" if have else " (this machine has cpu" + (", cuda" if torch.cuda.is_available()
                                                                               else "") + ")"))
    return name


def skeleton(cfg: ModelConfig) -> Transformer:
    """The model on the meta device (shapes, no memory), with quantized modules in place when cfg says so."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.quantization:
        swap_modules(model, cfg.quantization)
    return model


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None, *,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Transformer:
    """A Transformer of `cfg`: randomly initialised (no state_dict), or holding exactly `state_dict`'s tensors.

    Keys are checked strictly (missing or unexpected ones are an error naming them), except the OPTIONAL
    weights, which are freshly initialised when absent. The tensors are used as they are (no copy);
    dtype casts the floating-point ones and device moves the model. A tied head reads the embedding's
    weight, so there is nothing to re-tie.
    """
    if state_dict is None:
        if cfg.quantization:
            raise TinyMixtralError("a quantized model needs its weights: build it from a state dict")
        model = Transformer(cfg)
    else:
        model = skeleton(cfg)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        fresh = [k for k in missing if k.endswith(OPTIONAL)]
        missing = [k for k in missing if k not in fresh]
        if missing or unexpected:
            raise TinyMixtralError(f"the weights do not fit the config: missing {missing or 'none'}, "
                                   f"unexpected {unexpected or 'none'}")
        like = next(iter(state_dict.values()))
        for key in fresh:
            module_name, _, attr = key.rpartition(".")
            p = torch.nn.Parameter(torch.empty(model.get_parameter(key).shape, dtype=dtype or like.dtype,
                                               device=like.device))
            torch.nn.init.normal_(p, 0.0, cfg.init_std)
            setattr(model.get_submodule(module_name), attr, p)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.to(device) if device is not None else model
