"""Where a Mixtral's parameters, memory and FLOPs go (`tinymixtral params`), and the matmul rate MFU is taken against.

Counts come from the real module tree built on the meta device (no memory used), grouped by
component, so they can never drift from the model code. "Active" is what one token touches:
everything except the experts it is not routed to (top_k of n_experts per layer).
"""

from __future__ import annotations

import time

import torch

from .build import skeleton
from .config import ModelConfig
from .model.kernel_build import native_bf16

COMPONENTS = ("embedding", "attention", "router", "experts", "ffn", "norms", "head")
BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}


def component_of(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    if name.endswith("norm.weight"):
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.experts." in name:
        return "experts"
    if ".ffn." in name:
        return "ffn"
    raise AssertionError(f"parameter {name} has no component")


def count_params(cfg: ModelConfig) -> dict:
    """{'total', 'active', 'components': {name: {'total', 'active'}}} for a config."""
    model = skeleton(cfg.replace(quantization=None))  # counts are those of the full-precision model
    comps = {c: 0 for c in COMPONENTS}
    for name, p in model.named_parameters():  # tied head is one parameter, counted once (as embedding)
        comps[component_of(name)] += p.numel()
    active = dict(comps)
    if cfg.is_moe:
        active["experts"] = comps["experts"] * cfg.top_k // cfg.n_experts
    return {
        "total": sum(comps.values()),
        "active": sum(active.values()),
        "components": {c: {"total": comps[c], "active": active[c]} for c in COMPONENTS},
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x active non-embedding params + attention (PaLM appendix B), forward + backward."""
    c = count_params(cfg)
    n = c["active"] - c["components"]["embedding"]["active"]
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def fast_bf16(device) -> bool:
    """Whether `device` multiplies bf16 natively, so that bf16 products beat fp32 ones: a CUDA GPU with bf16
    support, or a CPU with AVX512-BF16 or AMX (where a 2048-square bf16 matmul runs 2-4x the fp32 rate; on
    CPUs without them it runs at about half)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and native_bf16()


def measure_matmul_flops(device, dtype=torch.float32, n: int = 1024) -> float:
    """FLOP/s of a square matmul here and now (the best of a run's measurements is the MFU denominator)."""
    a = torch.ones(n, n, device=device, dtype=dtype)  # no RNG: a resumed run must draw what an unbroken one draws
    b = torch.ones(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously), so that timings are real."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def report(cfg: ModelConfig, context: int | None = None, batch: int = 1) -> dict:
    """Parameter counts plus memory of weights, KV cache and training state (bytes; GB = 1e9)."""
    counts = count_params(cfg)
    total = counts["total"]
    context = context or cfg.max_seq_len
    per_token_kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim  # k and v, every layer
    window = min(context, cfg.sliding_window) if cfg.sliding_window else context
    kv = {
        "context": context,
        "batch": batch,
        "window": cfg.sliding_window,
        "full": {d: int(per_token_kv * context * batch * BYTES[d]) for d in ("fp32", "bf16")},
        "rolling": {d: int(per_token_kv * window * batch * BYTES[d]) for d in ("fp32", "bf16")},
    }
    return {
        **counts,
        "weights_bytes": {d: int(total * b) for d, b in BYTES.items()},
        "kv_cache_bytes": kv,
        # fp32 AdamW: weights 4 + grads 4 + two moments 8 bytes per parameter; activations not included.
        "training_bytes": {"weights": 4 * total, "grads": 4 * total, "adamw": 8 * total, "total": 16 * total},
    }


def _n(x: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(x)


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def format_report(r: dict, title: str) -> str:
    lines = [title, "", f"{'component':<12}{'total':>18}{'':>10}{'active/token':>18}"]
    for c, v in r["components"].items():
        if v["total"]:
            lines.append(f"{c:<12}{v['total']:>18,}{_n(v['total']):>10}{v['active']:>18,}")
    lines.append(f"{'all':<12}{r['total']:>18,}{_n(r['total']):>10}{r['active']:>18,}  ({_n(r['active'])} active)")
    ex = r["components"]["experts"]
    if ex["total"]:
        lines.append(f"experts hold {100 * ex['total'] / r['total']:.1f}% of the weights; each token uses only "
                     f"{_n(ex['active'])} of their {_n(ex['total'])}, so active = {_n(r['active'])} of {_n(r['total'])}")
    lines += ["", "weights:  " + "   ".join(f"{d} {_gb(b)}" for d, b in r["weights_bytes"].items())]
    if "disk_bytes" in r:
        lines.append(f"on disk:  {_gb(r['disk_bytes'])}")
    q = r.get("quantization")
    if q:  # the counts and memory above are those of the full-precision model it came from
        kind = "int8 per output channel" if q["bits"] == 8 else f"int4 in groups of {q['group_size']}"
        lines.append(f"quantized: {kind} (weight-only); full precision: {', '.join(q['skip'])}")
    kv = r["kv_cache_bytes"]
    lines.append(f"KV cache (context {kv['context']:,}, batch {kv['batch']}): "
                 + "   ".join(f"{d} {_gb(b)}" for d, b in kv["full"].items()))
    if kv["window"]:
        lines.append(f"  with the rolling window of {kv['window']:,}: "
                     + "   ".join(f"{d} {_gb(b)}" for d, b in kv["rolling"].items()))
    t = r["training_bytes"]
    lines.append(f"training (fp32 weights + grads + AdamW, no activations): {_gb(t['total'])}")
    return "\n".join(lines)
