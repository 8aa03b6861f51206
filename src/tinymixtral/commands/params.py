"""`tinymixtral params`: parameter count, active parameters and memory of a preset, config or model."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import TinyMixtralError
from ..params import format_report, report


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (e.g. tiny-mixtral, mixtral-8x7b)")
    src.add_argument("--config", help="a config.json file")
    src.add_argument("--model", help="a model directory")
    p.add_argument("--context", type=int, default=None, help="context length for the KV cache (default: max)")
    p.add_argument("--batch", type=int, default=1, help="batch size for the KV cache")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    if args.context is not None and args.context <= 0:
        raise TinyMixtralError(f"--context must be positive, got {args.context}")
    if args.batch <= 0:
        raise TinyMixtralError(f"--batch must be positive, got {args.batch}")
    if args.preset:
        cfg, title = ModelConfig.from_name(args.preset), f"preset {args.preset}"
    else:
        src = Path(args.config or args.model)
        if args.model and not src.is_dir():
            raise TinyMixtralError(f"model directory not found: {src}")
        cfg, title = ModelConfig.load(src), str(src)
    r = report(cfg, args.context, args.batch)
    if cfg.quantization:
        r["quantization"] = cfg.quantization
    if args.model:
        # the weights only (a run's checkpoint also holds trainer_state.safetensors)
        r["disk_bytes"] = sum(f.stat().st_size for f in Path(args.model).glob("model*.safetensors"))
    if args.json:
        print(json.dumps({**r, "config": cfg.to_hf_dict()}, indent=2))
    else:
        print(format_report(r, f"{title}: {cfg.model_type}, {cfg.n_layers} layers, d_model {cfg.d_model}"
                            + (f", {cfg.n_experts} experts top-{cfg.top_k}" if cfg.is_moe else ", dense")))
    return 0
