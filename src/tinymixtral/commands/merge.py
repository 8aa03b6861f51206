"""`tinymixtral merge CONFIG.yaml --out DIR`: a frankenMoE from dense models (mergekit-moe YAML)."""

from __future__ import annotations

from ..merging import merge
from . import seed


def add_arguments(p):
    p.add_argument("config", help="a mergekit-moe YAML file (base_model, gate_mode, dtype, experts_per_token, experts)")
    p.add_argument("--out", required=True, help="output Mixtral model directory")
    p.add_argument("--seed", type=seed, default=0, help="seed of gate_mode: random")


def run(args) -> int:
    model = merge(args.config, args.out, seed=args.seed)
    cfg = model.cfg
    print(f"{args.out}: {cfg.n_experts} experts, top-{cfg.top_k}, {cfg.n_layers} layers, "
          f"{model.num_params():,} parameters ({next(model.parameters()).dtype})")
    return 0
