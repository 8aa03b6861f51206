"""GB/s of weight bytes for batch-1..M weight-only products on the CPU: tinymixtral's AVX2 kernels (fp32
activations, "exact"; and activations quantized to int8 in blocks of 32, "q8", the default for a few rows) against
torch's (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, bf16 activations, their fast path) and a plain copy,
all in one process, in alternating rounds (the median of each over `--rounds`). Bytes = the quantized weight plus its scales (and zeros). Each weight is rotated among
copies totalling >= 128 MB, so every call reads from memory, not from the last-level cache.

    python benchmarks/woq_kernels.py [--m 1,4] [--reps 10] [--rounds 3] [--shapes 4096x4096,4096x14336] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tinymixtral.model import cpu_kernels
from tinymixtral.model.quant import quantize_int4, quantize_int8, unpack_nibbles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import copy_bandwidth  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # (in K, out N): Mistral-7B's products


def copy_gbs() -> float:
    """GB read per second by a large copy, as benchmarks/scale.py counts it."""
    return copy_bandwidth() / 1e9


def timed(fn, args_list, reps: int) -> float:
    """Seconds per call, median of `reps` passes over all the copies."""
    for a in args_list:
        fn(*a)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for a in args_list:
            fn(*a)
        ts.append((time.perf_counter() - t0) / len(args_list))
    return sorted(ts)[len(ts) // 2]


def bench(K: int, N: int, bits: int, M: int, reps: int, rounds: int) -> dict:
    w = torch.randn(N, K)
    if bits == 8:
        q, s = quantize_int8(w)
        ours = (q, s[:, 0].contiguous())
        theirs = (q, s[:, 0].bfloat16())
        nbytes = q.numel() + 4 * N
    else:
        q, s, z = quantize_int4(w, 32)
        ours = (q, s, z)
        theirs = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q).to(torch.int32), 1),
                  cpu_kernels.scales_and_zeros(s, z, torch.bfloat16))
        nbytes = q.numel() + 8 * s.numel()
    copies = max(1, -(-(128 << 20) // nbytes))
    x = torch.randn(M, K)
    xb = x.bfloat16()
    ops = torch.ops.tinymixtral_avx2
    if bits == 8:
        fns = {"ours_q8": (lambda a, b: ops.int8_q8_mm(x, a, b, None), ours),
               "ours": (lambda a, b: ops.int8_mm(x, a, b, None), ours),
               "torch": (lambda a, b: torch.ops.aten._weight_int8pack_mm(xb, a, b), theirs)}
    else:
        fns = {"ours_q8": (lambda a, b, c: ops.int4_q8_mm(x, a, b, c, 32, None), ours),
               "ours": (lambda a, b, c: ops.int4_mm(x, a, b, c, 32, None), ours),
               "torch": (lambda a, b: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, a, 32, b), theirs)}
    args = {name: [tuple(t.clone() for t in ts) for _ in range(copies)] for name, (_, ts) in fns.items()}
    gbs = {name: [] for name in fns}
    for _ in range(rounds):  # alternating: each round times every kernel once, the load shared between them
        for name, (fn, _) in fns.items():
            gbs[name].append(nbytes / timed(fn, args[name], reps) / 1e9)
    out = {"K": K, "N": N, "bits": bits, "M": M, "bytes": nbytes}
    out.update({f"{name}_GB_s": statistics.median(v) for name, v in gbs.items()})
    out["q8_over_torch"] = statistics.median(a / b for a, b in zip(gbs["ours_q8"], gbs["torch"]))
    out["q8_over_exact"] = statistics.median(a / b for a, b in zip(gbs["ours_q8"], gbs["ours"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,4")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=None, help="KxN,... (in x out); default: Mistral-7B's four")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not cpu_kernels.avx2_kernels():
        raise SystemExit("the AVX2 kernels are not available here")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rows = []
    copy = copy_gbs()
    print(f"threads {torch.get_num_threads()}  copy {copy:.1f} GB/s")
    for bits in map(int, args.bits.split(",")):
        for M in map(int, args.m.split(",")):
            for K, N in shapes:
                r = bench(K, N, bits, M, args.reps, args.rounds)
                r["copy_GB_s"] = copy
                rows.append(r)
                print(f"int{bits} M={M} {K:>5}->{N:<5}  q8 {r['ours_q8_GB_s']:5.1f} GB/s ({r['ours_q8_GB_s'] / copy:4.0%} of copy)"
                      f"  exact {r['ours_GB_s']:5.1f}  torch {r['torch_GB_s']:5.1f} GB/s  (q8/torch {r['q8_over_torch']:.2f}x,"
                      f" q8/exact {r['q8_over_exact']:.2f}x)", flush=True)
    copy2 = copy_gbs()
    print(f"copy at the end {copy2:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "copy_GB_s": [copy, copy2], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
