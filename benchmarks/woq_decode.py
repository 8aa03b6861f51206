"""Batch-1 greedy decode tok/s of a quantized model with tinymixtral's AVX2 kernels against torch's CPU kernels
(TINYMIXTRAL_KERNELS=torch), in one process: two copies of the same quantized random weights, timed in
alternating rounds after a warm-up; the ratio is the median of per-round ratios.

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
    old = copy.deepcopy(new)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    kernels = {"avx2": (new, AVX2), "torch": (old, lambda: False)}

    def run(name):
        model, flag = kernels[name]
        cpu_kernels.avx2_kernels = flag  # looked up at call time by quant.py and cpu_kernels.py
        t0 = time.perf_counter()
        ids = generate(model, prompt, args.tokens, compile=args.compile)
        return ids, args.tokens / (time.perf_counter() - t0)

    with torch.no_grad():
        same = torch.equal(run("avx2")[0], run("torch")[0])  # warm-up (and compile)
        tok_s = {"avx2": [], "torch": []}
        for _ in range(args.rounds):
            for name in tok_s:
                tok_s[name].append(run(name)[1])
    ratios = [a / b for a, b in zip(tok_s["avx2"], tok_s["torch"])]
    out = {"config": args.config or args.preset or "tiny-mixtral", "bits": args.bits, "compile": args.compile,
           "threads": torch.get_num_threads(), "tokens": args.tokens, "same_greedy_tokens": same,
           "avx2_tok_s": statistics.median(tok_s["avx2"]), "torch_tok_s": statistics.median(tok_s["torch"]),
           "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
