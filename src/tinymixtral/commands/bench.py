"""`tinymixtral bench`: training, prefill and decode speed, ours and transformers' (or llama.cpp's) side by side."""

from __future__ import annotations

import json

from ..bench import WHAT, format_result, run_bench
from ..bench_llama import format_vs_llama, run_vs_llama
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
    p.add_argument("--new-tokens", type=int, default=None, help="decode length (default 64; 128 with --vs llama.cpp)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-hf", action="store_true", help="time ours only")
    p.add_argument("--vs", choices=("transformers", "llama.cpp"), default="transformers",
                   help="llama.cpp: batch-1 decode and prefill against llama.cpp (llama-cpp-python) on the same "
                        "weights exported to GGUF, per precision pair (see --types); --new-tokens default 128")
    p.add_argument("--types", default="fp32,int8,int4",
                   help="with --vs llama.cpp: comma list of fp32 (vs F32), int8 (vs Q8_0), int4 (vs Q4_0)")
    p.add_argument("--threads", type=int, default=2, help="with --vs llama.cpp: threads for both")
    p.add_argument("--bits", type=int, choices=(8, 4), default=None,
                   help="quantize ours (weight-only int8/int4; prefill/decode only) against full-precision transformers")
    p.add_argument("--no-compile", action="store_true", help="time ours eagerly (default: our training loss and decode step compiled)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    if args.new_tokens is None:
        args.new_tokens = 128 if args.vs == "llama.cpp" else 64
    if args.vs == "llama.cpp":
        return _vs_llama(args)
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


def _vs_llama(args) -> int:
    what = tuple(w.strip() for w in args.what.split(",") if w.strip() and w.strip() != "train")
    if not what or any(w not in ("prefill", "decode") for w in what):
        raise TinyMixtralError(f"--vs llama.cpp times prefill and decode; got --what {args.what!r}")
    if args.bits is not None or args.decode_batch not in ("1,8", "1"):
        raise TinyMixtralError("--vs llama.cpp times batch-1 decode at each of --types; leave out --bits and --decode-batch")
    if min(args.seq, args.new_tokens, args.rounds, args.threads) < 1:
        raise TinyMixtralError("--seq, --new-tokens, --rounds and --threads must be >= 1")
    src = args.model or args.config
    cfg = ModelConfig.load(src) if src else ModelConfig.from_name(args.preset or "demo")
    pairs = tuple(t.strip() for t in args.types.split(",") if t.strip())
    r = run_vs_llama(cfg, pairs, what, args.seq, args.new_tokens, args.rounds, args.threads, compile=not args.no_compile)
    print(json.dumps(r, indent=2) if args.json else format_vs_llama(r))
    return 0
