"""`tinymixtral bench`: training, prefill and decode speed, ours and transformers' side by side.

One set of random weights is loaded into both models (through a saved HF directory, the same path a
user takes). Each round times ours, then theirs, on the same inputs, after warm-up; we report the
median and range over rounds, the ratio ours/theirs, tokens/s, and MFU against a matrix-multiply
rate measured in the same run.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time

import torch

from .build import build_model, pick_device
from .cache import KVCache
from .checkpoint import save_model
from .errors import TinyMixtralError
from .generation import generate
from .params import flops_per_token, measure_matmul_flops, sync
from .quantize import quantize_model

WHAT = ("train", "prefill", "decode")


def _time(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build_pair(cfg, device, hf: bool, seed: int = 0):
    """Our model with random weights, and transformers' model loaded from the same weights (or None)."""
    torch.manual_seed(seed)
    ours = build_model(cfg, device=device)
    theirs = None
    if hf:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            print("transformers is not installed: timing ours only", file=sys.stderr)
            return ours, None
        with tempfile.TemporaryDirectory() as tmp:
            save_model(ours, tmp)
            theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
    return ours, theirs


def train_step_fns(ours, theirs, batch, seq, device, compile: bool = False):
    """One fwd+bwd+AdamW step for each model, on the same random tokens (ours' loss compiled if asked)."""
    V = ours.cfg.vocab_size
    x = torch.randint(0, V, (batch, seq + 1), device=device)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=torch.device(device).type in ("cpu", "cuda"))

    def loss_ours():
        return ours(x[:, :-1], x[:, 1:])[0]  # what `train` minimises

    loss = torch.compile(loss_ours) if compile else loss_ours

    def step_ours():
        loss().backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    fns = {"ours": step_ours}
    if theirs is not None:
        opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=torch.device(device).type in ("cpu", "cuda"))
        theirs.config.output_router_logits = ours.cfg.router_aux_loss_coef > 0

        def step_theirs():
            out = theirs(x[:, :-1], labels=x[:, :-1])  # HF shifts labels itself
            out.loss.backward()
            opt_t.step()
            opt_t.zero_grad(set_to_none=True)

        fns["transformers"] = step_theirs
    return fns, batch * seq


def prefill_fns(ours, theirs, batch, seq, device):
    """The prompt pass of generation: fill the KV cache, logits of the last position only."""
    x = torch.randint(0, ours.cfg.vocab_size, (batch, seq), device=device)

    @torch.no_grad()
    def run_ours():
        cache = KVCache.for_model(ours, batch, seq)
        chunk = ours.cfg.sliding_window or seq
        for i in range(0, seq, chunk):
            ours(x[:, i:i + chunk], cache=cache, last_only=True)

    fns = {"ours": run_ours}
    if theirs is not None:
        fns["transformers"] = torch.no_grad()(lambda: theirs(x, use_cache=True, logits_to_keep=1))
    return fns, batch * seq


def decode_fns(ours, theirs, batch, new_tokens, device, prompt_len: int = 16, compile: bool = True):
    """Greedy generation of new_tokens after a short prompt (ours with a compiled decode step, unless told not)."""
    x = torch.randint(3, ours.cfg.vocab_size, (batch, prompt_len), device=device)
    fns = {"ours": lambda: generate(ours, x, new_tokens, compile=compile)}
    if theirs is not None:
        fns["transformers"] = lambda: theirs.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                      do_sample=False, pad_token_id=0)
    return fns, batch * new_tokens


def run_bench(cfg, what=WHAT, batch=8, seq=256, decode_batches=(1, 8), new_tokens=64, rounds=5,
              device=None, hf=True, bits=None, compile: bool = True) -> dict:
    """Time each phase for both models; returns {phase: {model: {median_s, min_s, max_s, tok_s}}, ...}.

    bits: 8 or 4 quantizes our model (weight-only) after loading; transformers keeps the full weights.
    compile: our decode step and training loss through torch.compile (compiled in the warm-up, not timed).
    """
    device = pick_device(device)
    if bits and "train" in what:
        raise TinyMixtralError("a quantized model is for inference: leave 'train' out of --what with --bits")
    ours, theirs = build_pair(cfg, device, hf)
    if bits:
        ours = quantize_model(ours, bits).eval()
    rates = [measure_matmul_flops(device)]  # again after every phase: MFU is against the best, as load varies
    phases = []
    if "train" in what:
        phases.append((f"train {batch}x{seq}", lambda: train_step_fns(ours.train(), theirs and theirs.train(),
                                                                        batch, seq, device, compile), True))
    if "prefill" in what:
        phases.append((f"prefill 1x{seq}", lambda: prefill_fns(ours.eval(), theirs and theirs.eval(), 1, seq,
                                                               device), False))
    if "decode" in what:
        for b in decode_batches:
            phases.append((f"decode batch {b}", lambda b=b: decode_fns(ours.eval(), theirs and theirs.eval(), b,
                                                                        new_tokens, device, compile=compile), False))
    result = {"config": cfg.to_hf_dict(), "device": str(device), "threads": torch.get_num_threads(),
              "matmul_flops": None, "ours_bits": bits,
              "ours_compiled": [w for w in ("train", "decode") if compile and w in what], "phases": {}}
    for name, make, training in phases:
        fns, tokens = make()
        for fn in fns.values():  # warm-up (allocator, kernels, lazy init)
            fn()
        times = {k: [] for k in fns}
        for _ in range(rounds):  # alternate, so drift in machine load hits both alike
            for k, fn in fns.items():
                times[k].append(_time(fn, device))
        row = {}
        for k, ts in times.items():
            med = statistics.median(ts)
            row[k] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "tok_s": tokens / med}
        if "transformers" in row:
            ratios = [a / b for a, b in zip(times["transformers"], times["ours"])]
            row["speedup"] = {"median": row["transformers"]["median_s"] / row["ours"]["median_s"],
                              "min": min(ratios), "max": max(ratios)}
        result["phases"][name] = row
        rates.append(measure_matmul_flops(device))
    result["matmul_flops"] = peak = max(rates)
    for name in (name for name, _, training in phases if training):
        for m in (result["phases"][name][who] for who in fns):
            m["mfu"] = m["tok_s"] * flops_per_token(cfg, seq) / peak
    if torch.device(device).type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def format_result(r: dict) -> str:
    quant = f"; ours int{r['ours_bits']} weight-only vs transformers full precision" if r.get("ours_bits") else ""
    quant += f"; ours compiled: {', '.join(r['ours_compiled'])}" if r.get("ours_compiled") else ""
    lines = [f"device {r['device']}, {r['threads']} threads, matmul {r['matmul_flops'] / 1e9:.0f} GFLOP/s (fp32){quant}",
             f"{'phase':<18}{'ours tok/s':>12}{'hf tok/s':>12}{'speedup':>9}{'  range':<14}{'ours MFU':>9}{'hf MFU':>8}"]
    for name, row in r["phases"].items():
        o, t, s = row["ours"], row.get("transformers"), row.get("speedup")
        theirs = f"{t['tok_s']:,.0f}" if t else "-"
        speedup = f"{s['median']:.2f}x" if s else "-"
        spread = f"  {s['min']:.2f}-{s['max']:.2f}" if s else ""
        mfu = f"{o['mfu']:>9.0%}{t['mfu'] if t else 0:>8.0%}" if "mfu" in o else ""
        lines.append(f"{name:<18}{o['tok_s']:>12,.0f}{theirs:>12}{speedup:>9}{spread:<14}{mfu}")
    if "peak_memory_bytes" in r:
        lines.append(f"peak GPU memory {r['peak_memory_bytes'] / 2**30:.2f} GiB")
    else:
        lines.append(f"peak process RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB (both models)")
    return "\n".join(lines)
