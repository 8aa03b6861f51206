"""`tinymixtral eval`: loss, perplexity and bits per byte of a model on a data split."""

from __future__ import annotations

import json

import torch

from ..errors import TinyMixtralError
from ..evaluate import eval_model
from . import add_load_options, load_options


def add_arguments(p):
    p.add_argument("--model", required=True, help="a model directory")
    p.add_argument("--data", required=True, help="a prepared data directory")
    p.add_argument("--split", default="val", help="val or train")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: 512 or the model's max)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--json", action="store_true")
    add_load_options(p)


def run(args) -> int:
    for name in ("batch_size", "max_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TinyMixtralError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    r = eval_model(args.model, args.data, args.split, args.seq_len, args.batch_size, args.max_batches,
                   **load_options(args, torch.float32))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']}")
        which = " assistant" if r["assistant_only"] else ""
        print(f"{args.split}: loss {r['loss']:.4f} nats/token   perplexity {r['ppl']:.3f}   "
              f"{r['bpb']:.4f} bits/byte   ({r['tokens']:,}{which} tokens, windows of {r['seq_len']})")
    return 0
