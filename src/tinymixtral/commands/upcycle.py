"""`tinymixtral upcycle`: a Mixtral whose experts start as copies of a dense model's FFN."""

from __future__ import annotations

import sys

from ..checkpoint import has_tokenizer, load_model, save_model
from ..upcycling import ROUTER_INITS, upcycle
from . import seed


def add_arguments(p):
    p.add_argument("--model", required=True, help="a dense (Mistral-architecture) model directory")
    p.add_argument("--experts", type=int, required=True, help="number of experts per layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token")
    p.add_argument("--out", required=True, help="output Mixtral model directory")
    p.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise on each expert copy, as a fraction of each weight matrix's std (default 0)")
    p.add_argument("--router", choices=ROUTER_INITS, default="random",
                   help="router init: random = normal(0, init_std), zero = all zeros (default random)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the router and noise draws")


def run(args) -> int:
    dense = load_model(args.model)
    model = upcycle(dense, args.experts, args.top_k, args.noise, args.router, args.seed)
    tokenizer = args.model if has_tokenizer(args.model) else None
    if tokenizer is None:
        print(f"upcycle: warning: {args.model} has no tokenizer files; none copied", file=sys.stderr)
    save_model(model, args.out, tokenizer=tokenizer)
    n_dense, n_moe = dense.num_params(), model.num_params()
    print(f"{args.out}: {args.experts} experts, top-{args.top_k}, router {args.router}, noise {args.noise}; "
          f"{n_moe:,} parameters (dense model: {n_dense:,})")
    return 0
