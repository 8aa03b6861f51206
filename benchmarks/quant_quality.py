"""What weight-only quantization costs and buys: perplexity, routing agreement, size and decode speed.

    python benchmarks/quant_quality.py --model runs/demo/best --data data/stories [--group-size 32]

For fp32, bf16 (reference), int8 and int4 (same model, quantized in memory exactly as `tinymixtral quantize`
does; the tests check that the saved directory loads to the same model):
- perplexity on every non-overlapping window of the val split (the windows `tinymixtral eval` uses);
- routing agreement vs fp32: per layer, the fraction of tokens whose chosen expert SET is unchanged,
  averaged over layers (on the same eval windows);
- weight bytes (tensor bytes; a safetensors file adds a small header);
- greedy decode tokens/s at batch 1 and 8: a short prompt, then --new-tokens tokens (prefill included,
  warm-up first), median of --repeats runs.
Then decode speed at batch 1 on a RANDOM model of the tiny-mixtral preset shape (--speed-preset).
The CPU may be shared with other work: speeds are medians, and the run states its thread count.
"""

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinymixtral import generate, load_model
from tinymixtral.build import build_model
from tinymixtral.config import ModelConfig
from tinymixtral.data import load_split, window_starts, windows
from tinymixtral.quantize import quantize_model


def variants(model, group_size: int) -> dict:
    return {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16),
            "int8": quantize_model(model, 8), f"int4-g{group_size}": quantize_model(model, 4, group_size)}


def weight_bytes(model) -> int:
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # a tied head counts once
    return sum(t.numel() * t.element_size() for t in seen.values())


@torch.no_grad()
def quality(models: dict, data, seq_len: int, batch: int, max_batches: int | None) -> dict:
    """{name: {'ppl', 'routing_agreement'}} over the val split's non-overlapping windows."""
    starts = window_starts(len(data), batch, seq_len, max_batches)  # the windows `tinymixtral eval` reads
    nll = {k: 0.0 for k in models}
    agree = {k: [] for k in models}
    tokens = 0
    for i in range(0, len(starts), batch):
        x, y = windows(data, starts[i:i + batch], seq_len)
        ref_routes = None
        for name, m in models.items():
            logits = m(x).float()
            nll[name] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            routes = [r.experts_NK.sort(-1).values for r in m.routing()]
            ref_routes = ref_routes or routes  # fp32 comes first
            agree[name].append([(a == b).all(-1).float().mean().item() for a, b in zip(ref_routes, routes)])
        tokens += y.numel()
    return {k: {"ppl": math.exp(nll[k] / tokens), "routing_agreement": float(np.mean(agree[k])),
                "routing_agreement_per_layer": np.mean(agree[k], axis=0).round(4).tolist()} for k in models}


@torch.no_grad()
def decode_speed(model, prompts: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median tokens/s (all rows) of greedy generation after a warm-up."""
    generate(model, prompts, max_new_tokens=4)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, prompts, max_new_tokens=new_tokens)
        times.append(time.perf_counter() - t0)
    return prompts.shape[0] * new_tokens / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a full-precision model directory")
    ap.add_argument("--data", required=True, help="its prepared data directory (val split)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-preset", default="tiny-mixtral", help="random model for the extra speed test ('' = skip)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model, dtype=torch.float32)
    models = variants(model, args.group_size)
    data, _ = load_split(args.data, "val")
    seq_len = min(args.seq_len, model.cfg.max_seq_len, len(data) - 1)
    t0 = time.perf_counter()
    rows = quality(models, data, seq_len, args.batch_size, args.max_batches)
    print(f"quality on {args.data} val, windows of {seq_len}: {time.perf_counter() - t0:.0f} s")
    prompts = torch.from_numpy(np.stack([data[i * 997:i * 997 + args.prompt_len].astype(np.int64) for i in range(8)]))
    for name, m in models.items():
        rows[name]["weight_MB"] = weight_bytes(m) / 1e6
        for b in (1, 8):
            rows[name][f"tok_s_b{b}"] = decode_speed(m, prompts[:b], args.new_tokens, args.repeats)
        print(name, rows[name])
    fp = rows["fp32"]["ppl"]
    print(f"\n{args.model} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{model.cfg.n_experts} experts), {args.threads} thread(s), medians of {args.repeats}")
    print(f"{'':<10}{'val ppl':>10}{'vs fp32':>9}{'routing':>9}{'weights MB':>12}{'tok/s b1':>10}{'tok/s b8':>10}")
    for name, r in rows.items():
        print(f"{name:<10}{r['ppl']:>10.4f}{100 * (r['ppl'] / fp - 1):>+8.2f}%{100 * r['routing_agreement']:>8.1f}%"
              f"{r['weight_MB']:>12.2f}{r['tok_s_b1']:>10.1f}{r['tok_s_b8']:>10.1f}")

    speed = {}
    if args.speed_preset:
        torch.manual_seed(0)
        big = build_model(ModelConfig.from_name(args.speed_preset)).eval()
        for name, m in variants(big, args.group_size).items():
            speed[name] = {"weight_MB": weight_bytes(m) / 1e6,
                           "tok_s_b1": decode_speed(m, prompts[:1] % big.cfg.vocab_size, args.new_tokens,
                                                    args.repeats)}
            del m
        print(f"\nrandom {args.speed_preset}, batch 1, {args.new_tokens} new tokens, medians of {args.repeats}")
        for name, r in speed.items():
            print(f"{name:<10}{r['weight_MB']:>12.1f} MB{r['tok_s_b1']:>10.1f} tok/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "model": rows, "speed_preset": speed},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
