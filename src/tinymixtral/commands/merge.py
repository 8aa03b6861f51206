"""`tinymixtral merge CONFIG.yaml --out DIR`: a frankenMoE from dense models (mergekit-moe YAML)."""

from __future__ import annotations

from ..merging import merge
from ..params import count_params
from . import seed


def add_arguments(p):
    p.add_argument("config", help="a mergekit-moe YAML file (base_model, gate_mode, dtype, experts_per_token, experts)")
    p.add_argument("--out", required=True, help="output Mixtral model directory")
    p.add_argument("--seed", type=seed, default=0, help="seed of gate_mode: random")


def run(args) -> int:
    cfg = merge(args.config, args.out, seed=args.seed)
    print(f"{args.out}: {cfg.n_experts} experts, top-{cfg.top_k}, {cfg.n_layers} layers, "
          f"{count_params(cfg)['total']:,} parameters")
    return 0
