"""Batch-1 greedy decode tok/s of a quantized model with tinymixtral's AVX2 kernels, int8 activations ("q8", the
default) and fp32 ones ("exact", TINYMIXTRAL_KERNELS=exact), against torch's CPU kernels (TINYMIXTRAL_KERNELS=torch),
in one process: three copies of the same quantized random weights, timed in alternating rounds after a warm-up;
each ratio is the median of per-round ratios. int4 runs our kernels here whatever cpu_kernels.INT4_OURS says.

    python benchmarks/woq_decode.py --preset tiny-mixtral --bits 8 [--compile] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from tinymixtral import generate
from tinymixtral.build import build_model
from tinymixtral.config import ModelConfig
from tinymixtral.model import cpu_kernels
from tinymixtral.quantize import quantize_model

AVX2 = cpu_kernels.avx2_kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    assert AVX2(), "the AVX2 kernels are not available here"
    cfg = ModelConfig.load(args.config) if args.config else ModelConfig.from_name(args.preset or "tiny-mixtral")
    torch.manual_seed(0)
    base = build_model(cfg).eval()
    new = quantize_model(base, args.bits, 32 if args.bits == 4 else None)
    exact, old = copy.deepcopy(new), copy.deepcopy(new)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    kernels = {"q8": (new, AVX2, True), "exact": (exact, AVX2, False), "torch": (old, lambda: False, False)}

    def run(name):
        model, flag, q8 = kernels[name]
        # looked up at call time by quant.py and cpu_kernels.py
        cpu_kernels.avx2_kernels, cpu_kernels.QUANT_ACTIVATIONS, cpu_kernels.INT4_OURS = flag, q8, True
        t0 = time.perf_counter()
        ids = generate(model, prompt, args.tokens, compile=args.compile)
        return ids, args.tokens / (time.perf_counter() - t0)

    with torch.no_grad():
        ids = {name: run(name)[0] for name in kernels}  # warm-up (and compile)
        tok_s = {name: [] for name in kernels}
        for _ in range(args.rounds):
            for name in tok_s:
                tok_s[name].append(run(name)[1])

    def ratio(a, b):
        r = [x / y for x, y in zip(tok_s[a], tok_s[b])]
        return {"median": statistics.median(r), "range": [min(r), max(r)]}

    out = {"config": args.config or args.preset or "tiny-mixtral", "bits": args.bits, "compile": args.compile,
           "threads": torch.get_num_threads(), "tokens": args.tokens, "rounds": args.rounds,
           "same_greedy_tokens_q8_exact": torch.equal(ids["q8"], ids["exact"]),
           **{f"{name}_tok_s": statistics.median(v) for name, v in tok_s.items()},
           "q8_over_exact": ratio("q8", "exact"), "q8_over_torch": ratio("q8", "torch"),
           "exact_over_torch": ratio("exact", "torch")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
