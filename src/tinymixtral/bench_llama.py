"""`tinymixtral bench --vs llama.cpp`: batch-1 decode and prefill, ours against llama.cpp on the same weights.

One set of random weights; for each precision pair ours is built from them (fp32, or quantized int8/int4)
and the GGUF llama.cpp runs is exported from the very same weights (F32, Q8_0, Q4_0; `export.write_gguf`).
Both run on the same number of threads; each round times ours then llama.cpp's on the same token ids,
after a warm-up (which also compiles our decode step). We report per-phase tokens/s and the median of
the per-round ratios (ours speed / llama.cpp's speed) with their range.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .build import build_model
from .cache import KVCache
from .errors import TinyMixtralError
from .export import write_gguf
from .generation import generate
from .model import fused
from .quantize import quantize_model
from .tokenizer import load_tokenizer, train_bpe

# ours, its bits, the GGUF type llama.cpp runs
PAIRS = {"fp32": (None, "f32"), "int8": (8, "q8_0"), "int4": (4, "q4_0")}
WORDS = "once upon a time there was a little dog who ran to the park and saw a big red ball".split()


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise TinyMixtralError("--vs llama.cpp needs llama-cpp-python: pip install llama-cpp-python gguf") from None
    if not llama_cpp_runs_quantized():
        raise TinyMixtralError(f"this llama.cpp build crashes on Q8_0/Q4_0 here ({NO_AMX_HINT})")
    return llama_cpp


# llama.cpp built with -march=native on a CPU that reports AMX compiles its AMX kernels in, and on some machines
# (seen: a VM whose CPU reports amx_tile/amx_int8) their first tileloadd dies with SIGILL, which takes the process
# down. Built with these flags it uses its AVX-512/VNNI kernels instead.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
NO_AMX_HINT = (f"its AMX kernels fault on this machine: rebuild it without them, CFLAGS='{NO_AMX_FLAGS}' "
               f"CXXFLAGS='{NO_AMX_FLAGS}' pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python; "
               "python3 run.py setup does this")
_RUNS: list[bool] = []


def llama_cpp_runs_quantized() -> bool:
    """Whether llama.cpp evaluates a tiny Q8_0 and Q4_0 model here without dying. Asked once per process, in a
    child process (a crash there costs nothing)."""
    if not _RUNS:
        code = "from tinymixtral.bench_llama import _probe; _probe()"
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
            _RUNS.append(r.returncode == 0)
        except subprocess.TimeoutExpired:
            _RUNS.append(False)
    return _RUNS[0]


def _probe():
    """The child of `llama_cpp_runs_quantized`: Q8_0 and Q4_0 of a tiny random MoE, a 40-token prompt each."""
    import llama_cpp

    from .config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, n_experts=4,
                      top_k=2, max_seq_len=64)
    model, tok = build_model(cfg).eval(), _tokenizer(cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        for gtype in ("q8_0", "q4_0"):
            path = Path(tmp) / f"{gtype}.gguf"
            write_gguf(model, tok, path, gtype, full_context=True, progress=False)
            llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
            llm.eval(list(range(3, 43)))
            llm.close()


def _tokenizer(vocab_size: int):
    """Any tokenizer that fits the vocabulary (the bench feeds token ids; the GGUF file needs one)."""
    if vocab_size >= 32000:
        return load_tokenizer("mistral")
    return train_bpe([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], min(vocab_size, 300))


def _llama_decode(llama_cpp, llm, prompt: list[int], n: int) -> list[int]:
    """Greedy batch-1 decoding through llama.cpp's KV cache, one eval per token (argmax of the last logits)."""
    llm.reset()
    llm.eval(prompt)
    V, out = llm.n_vocab(), []
    for _ in range(n):
        out.append(int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(V,)))))
        llm.eval([out[-1]])
    return out


def _timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up: allocator, kernels, our compiled decode step
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):  # alternate, so drift in machine load hits both alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def run_vs_llama(cfg, pairs=tuple(PAIRS), what=("prefill", "decode"), seq: int = 256, new_tokens: int = 128,
                 rounds: int = 5, threads: int = 2, compile: bool = True, prompt_len: int = 16, seed: int = 0) -> dict:
    """{phase: {"ours": {median_s, min_s, max_s, tok_s}, "llama.cpp": {...}, "ratio": {median, min, max}}}."""
    llama_cpp = _llama_cpp()
    bad = [p for p in pairs if p not in PAIRS]
    if bad or not pairs:
        raise TinyMixtralError(f"--types takes {', '.join(PAIRS)}; got {','.join(pairs) or 'nothing'}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base = build_model(cfg).eval()
    tok = _tokenizer(cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    x_prefill = torch.randint(3, cfg.vocab_size, (1, seq), generator=g)
    x_decode = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=g)
    result = {"config": cfg.to_hf_dict(), "threads": threads, "rounds": rounds, "seq": seq, "new_tokens": new_tokens,
              "ours_compiled": compile, "llama_cpp_version": llama_cpp.__version__, "phases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in pairs:
            bits, gtype = PAIRS[name]
            ours = quantize_model(base, bits).eval() if bits else base
            path = Path(tmp) / f"{gtype}.gguf"
            write_gguf(base, tok, path, gtype, full_context=True, progress=False)
            llm = llama_cpp.Llama(str(path), n_ctx=max(seq, prompt_len + new_tokens) + 8, n_batch=seq, n_ubatch=seq,
                                  n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
            phases = {}
            if "prefill" in what:
                def theirs_prefill(ids=x_prefill[0].tolist()):
                    llm.reset()
                    llm.eval(ids)

                phases[f"prefill 1x{seq}, {name} vs {gtype.upper()}"] = (
                    {"ours": _prefill_on(ours, x_prefill), "llama.cpp": theirs_prefill}, seq)
            if "decode" in what:
                prompt = x_decode[0].tolist()
                result.setdefault("ours_decode", {})[name] = ("one op a step (fused)" if fused.plan(ours, 1) is not None
                                                              else "compiled" if compile else "eager")
                phases[f"decode batch 1, {name} vs {gtype.upper()}"] = (
                    {"ours": lambda: generate(ours, x_decode, new_tokens, compile=compile),
                     "llama.cpp": lambda: _llama_decode(llama_cpp, llm, prompt, new_tokens)}, new_tokens)
            for phase, (fns, tokens) in phases.items():
                times = _timed_rounds(fns, rounds)
                row = {k: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                           "tok_s": tokens / statistics.median(ts)} for k, ts in times.items()}
                ratios = [b / a for a, b in zip(times["ours"], times["llama.cpp"])]  # ours speed / theirs
                row["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
                result["phases"][phase] = row
            llm.close()
            del ours, llm
            path.unlink()
    return result


def _prefill_on(model, x_BS):
    """Our prompt pass on given ids (chunks of at most the window, last position's logits only)."""
    @torch.no_grad()
    def run():
        cache = KVCache.for_model(model, 1, x_BS.shape[1])
        chunk = model.cfg.sliding_window or x_BS.shape[1]
        for i in range(0, x_BS.shape[1], chunk):
            model(x_BS[:, i:i + chunk], cache=cache, last_only=True)
    return run


def format_vs_llama(r: dict) -> str:
    lines = [f"{r['threads']} threads, {r['rounds']} rounds, llama-cpp-python {r['llama_cpp_version']}, "
             "ours decode: " + (", ".join(f"{k} {v}" for k, v in r["ours_decode"].items()) if r.get("ours_decode")
                                else "compiled" if r["ours_compiled"] else "eager"),
             f"{'phase':<36}{'ours tok/s':>12}{'llama.cpp':>12}{'ratio':>9}  range"]
    for name, row in r["phases"].items():
        s = row["ratio"]
        lines.append(f"{name:<36}{row['ours']['tok_s']:>12,.0f}{row['llama.cpp']['tok_s']:>12,.0f}"
                     f"{s['median']:>8.2f}x  {s['min']:.2f}-{s['max']:.2f}")
    return "\n".join(lines)
