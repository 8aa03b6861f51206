"""`tinymixtral bench`: training, prefill and decode speed, ours and transformers' side by side.

One set of random weights is loaded into both models (through a saved HF directory, the same path a
user takes). Each round times ours, then theirs, on the same inputs, after warm-up; we report the
median and range over rounds, the ratio ours/theirs, tokens/s, and MFU against a matrix-multiply
rate measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch

from .errors import TinyMixtralError

WHAT = ("train", "prefill", "decode")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure_matmul_flops(device, dtype=torch.float32, n: int = 1024) -> float:
    """FLOP/s of a square matmul here and now (the best of a run's measurements is the MFU denominator)."""
    a = torch.ones(n, n, device=device, dtype=dtype)  # no RNG: a resumed run must draw what an unbroken one draws
    b = torch.ones(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)



def build_pair(cfg, device, hf: bool, seed: int = 0):
    """Our model with random weights, and transformers' model loaded from the same weights (or None)."""
    from .checkpoint import save_model
    from .model.transformer import Transformer

    torch.manual_seed(seed)
    ours = Transformer(cfg).to(device)
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
    from .train import loss_fn

    V = ours.cfg.vocab_size
    x = torch.randint(0, V, (batch, seq + 1), device=device)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=torch.device(device).type in ("cpu", "cuda"))

    def loss_ours():
        return loss_fn(ours, x[:, :-1], x[:, 1:])[0]  # what `train` minimises

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
    from .cache import KVCache

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
    from .generation import generate

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
    from .params import flops_per_token

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if bits and "train" in what:
        raise TinyMixtralError("a quantized model is for inference: leave 'train' out of --what with --bits")
    ours, theirs = build_pair(cfg, device, hf)
    if bits:
        from .quantize import quantize_model

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
        import resource

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
    from .config import ModelConfig

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
    r = run_bench(cfg, what, args.batch, args.seq, decode_batches, args.new_tokens, args.rounds, args.device,
                  hf=not args.no_hf, bits=args.bits, compile=not args.no_compile)
    print(json.dumps(r, indent=2) if args.json else format_result(r))
    return 0
