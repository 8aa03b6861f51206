"""`tinymixtral upcycle`: a Mixtral whose experts start as copies of a dense model's FFN."""

from __future__ import annotations

import sys

from ..checkpoint import has_tokenizer
from ..params import count_params
from ..upcycling import ROUTER_INITS, upcycle_dir
from . import seed


def add_arguments(p):
    p.add_argument("--model", required=True, help="a dense (Mistral-architecture) model directory, Hugging Face or Mistral-native")
    p.add_argument("--experts", type=int, required=True, help="number of experts per layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token")
    p.add_argument("--out", required=True, help="output Mixtral model directory")
    p.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise on each expert copy, as a fraction of each weight matrix's std (default 0)")
    p.add_argument("--router", choices=ROUTER_INITS, default="random",
                   help="router init: random = normal(0, init_std), zero = all zeros (default random)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the router and noise draws")


def run(args) -> int:
    cfg = upcycle_dir(args.model, args.out, args.experts, args.top_k, args.noise, args.router, args.seed)
    if not has_tokenizer(args.model):
        print(f"upcycle: warning: {args.model} has no tokenizer files; none copied", file=sys.stderr)
    n_dense, n_moe = (count_params(c)["total"] for c in (cfg.replace(n_experts=0), cfg))
    print(f"{args.out}: {args.experts} experts, top-{args.top_k}, router {args.router}, noise {args.noise}; "
          f"{n_moe:,} parameters (dense model: {n_dense:,})")
    return 0
