"""`tinymixtral bench`: training, prefill and decode speed, ours and transformers' side by side."""

from __future__ import annotations

import json

from ..bench import WHAT, format_result, run_bench
from ..config import MAX_SIZE, ModelConfig
from ..errors import TinyMixtralError


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="a preset (default: demo)")
    src.add_argument("--model", default=None, help="take the config of a model directory (weights are random)")
    src.add_argument("--config", default=None, help="a config.json")
    p.add_argument("--what", default="train,prefill,decode", help="comma list of: " + ", ".join(WHAT))
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--seq", type=int, default=256, help="training and prefill length")
    p.add_argument("--decode-batch", default="1,8", help="comma list of decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    p.add_argument("--bits", type=int, choices=(8, 4), default=None,
                   help="quantize ours (weight-only int8/int4; prefill/decode only) against full-precision transformers")
    p.add_argument("--no-compile", action="store_true", help="time ours eagerly (default: our training loss and decode step compiled)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    bad = [w for w in what if w not in WHAT]
    if bad or not what:
        raise TinyMixtralError(f"--what takes {', '.join(WHAT)}; got {args.what!r}")
    try:
        decode_batches = tuple(int(b) for b in args.decode_batch.split(","))
    except ValueError:
        raise TinyMixtralError(f"--decode-batch must be comma-separated integers, got {args.decode_batch!r}") from None
    if min(args.batch, args.seq, args.new_tokens, args.rounds, *decode_batches) < 1:
        raise TinyMixtralError("--batch, --seq, --new-tokens, --rounds and --decode-batch must be >= 1")
    src = args.model or args.config
    cfg = ModelConfig.load(src) if src else ModelConfig.from_name(args.preset or "demo")
    if args.seq > cfg.max_seq_len or max(args.batch, args.new_tokens, args.rounds, *decode_batches) > MAX_SIZE:
        raise TinyMixtralError(f"--seq must be at most the model's max_seq_len ({cfg.max_seq_len}), and --batch, "
                               f"--new-tokens, --rounds and --decode-batch at most {MAX_SIZE:,}")
    r = run_bench(cfg, what, args.batch, args.seq, decode_batches, args.new_tokens, args.rounds, args.device,
                  hf=not args.no_hf, bits=args.bits, compile=not args.no_compile)
    print(json.dumps(r, indent=2) if args.json else format_result(r))
    return 0
