"""Real-size checkpoints on this machine: load time and peak memory (bf16, int8, int4 on load), and batch-1
decode speed next to its memory-bandwidth limit.

    python benchmarks/scale.py --shape mistral-7b --dir /tmp/scale --out benchmarks/scale.result.json
    python benchmarks/scale.py --shape mixtral-8x7b-8layers --dir /tmp/scale --modes int8,int4,quantize-4
    python benchmarks/scale.py --shape mistral-7b --dir /tmp/scale --modes int8,llama-q8_0,int4,llama-q4_0

It writes a random-weight bf16 checkpoint with the real shapes (Mistral-7B: 7.24B parameters, 14.5 GB;
Mixtral-8x7B cut to 8 of its 32 layers: ~11.7B parameters with real 14336 x 4096 experts), one tensor
at a time, then runs each measurement in a fresh process and reads its peak from VmHWM (ru_maxrss would
start at this parent's peak). The bandwidth limit is the bytes one decode step must read (every weight
but the embedding; for an MoE, the experts a token uses) over the read bandwidth measured in the same run
(a 2-thread sum of a 1 GiB tensor: decode only reads weights). The llama-q8_0 / llama-q4_0 modes export
the same checkpoint to GGUF (`export.write_gguf`, in its own process) and time llama.cpp's batch-1 decode
on it (llama-cpp-python, the same threads): the fastest CPU engine on the same weights and machine.
Delete --dir after the run: the files are many GB (--delete does it).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinymixtral import tensorfile
from tinymixtral.build import skeleton
from tinymixtral.config import ModelConfig
from tinymixtral.convert import to_hf

SHAPES = {
    "mistral-7b": ModelConfig.from_name("mistral-7b"),
    "mixtral-8x7b-8layers": ModelConfig.from_name("mixtral-8x7b", n_layers=8),
    "tiny-mixtral": ModelConfig.from_name("tiny-mixtral"),  # a smoke test of the script (0.5 GB)
}

CHILD = r"""
import json, sys, time, torch
from tinymixtral.checkpoint import load_model
from tinymixtral.generation import generate
def status(f):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(f + ":"))
path, mode, tokens, compile_ = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
base = status("VmRSS")
t0 = time.perf_counter()
if mode.startswith("quantize-"):  # the `quantize` command itself, in this process: load as int, write shards
    import os, shutil, tempfile
    from tinymixtral.cli import main
    out = tempfile.mkdtemp(dir=os.path.dirname(path))
    try:
        assert main(["quantize", "--model", path, "--bits", mode[-1], "--out", out + "/q"]) == 0
        disk = sum(os.path.getsize(f"{out}/q/{f}") for f in os.listdir(out + "/q") if f.endswith(".safetensors"))
    finally:
        shutil.rmtree(out)
    print(json.dumps({"mode": mode, "load_s": time.perf_counter() - t0, "load_peak_bytes": status("VmHWM") - base,
                      "model_bytes": disk, "peak_bytes": status("VmHWM") - base}))
    sys.exit(0)
if mode.startswith("llama-"):  # llama.cpp on the GGUF export of this checkpoint
    import llama_cpp
    from tinymixtral.bench_llama import _llama_decode
    llm = llama_cpp.Llama(path, n_ctx=64, n_batch=8, n_threads=torch.get_num_threads(),
                          n_threads_batch=torch.get_num_threads(), logits_all=False, verbose=False)
    out = {"mode": mode, "load_s": time.perf_counter() - t0, "load_peak_bytes": status("VmHWM") - base}
    prompt = [1, 415, 2936, 9060, 285, 1142]
    _llama_decode(llama_cpp, llm, prompt, 2)  # warm-up
    t0 = time.perf_counter()
    _llama_decode(llama_cpp, llm, prompt, tokens - 1)  # the prompt pass + tokens - 1 steps, as ours below
    out["decode_tok_s"] = (tokens - 1) / (time.perf_counter() - t0)
    out["peak_bytes"] = status("VmHWM") - base
    print(json.dumps(out))
    sys.exit(0)
kw = {"bf16": dict(dtype=torch.bfloat16), "int8": dict(dtype=torch.bfloat16, bits=8),
      "int4": dict(dtype=torch.bfloat16, bits=4)}[mode]
model = load_model(path, **kw)
load_s = time.perf_counter() - t0
peak_load = status("VmHWM") - base
size = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
out = {"mode": mode, "load_s": load_s, "load_peak_bytes": peak_load, "model_bytes": size}
if tokens:
    x = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    generate(model, x, 2, compile=compile_)  # warm-up (and compile)
    t0 = time.perf_counter()
    generate(model, x, tokens, compile=compile_)
    out["decode_tok_s"] = (tokens - 1) / (time.perf_counter() - t0)  # the prompt pass is one step
    out["compiled"] = compile_
out["peak_bytes"] = status("VmHWM") - base
print(json.dumps(out))
"""

EXPORT = r"""
import sys, torch
from tinymixtral.checkpoint import load_model
from tinymixtral.export import write_gguf
from tinymixtral.tokenizer import load_tokenizer
model = load_model(sys.argv[1], dtype=torch.bfloat16)  # as stored; write_gguf quantizes one tensor at a time
write_gguf(model, load_tokenizer("mistral"), sys.argv[2], sys.argv[3], full_context=True, progress=False)
"""


def write_checkpoint(cfg: ModelConfig, out: Path, shard_bytes: int = 2 * 2**30):
    """Random bf16 weights with the real shapes, written shard by shard (never the whole model in memory)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    shapes = {k: tuple(v.shape) for k, v in to_hf(skeleton(cfg).state_dict(), cfg).items()}
    gen = torch.Generator().manual_seed(0)
    current, size, n_shards, weight_map = {}, 0, 0, {}
    names = list(shapes)
    for i, name in enumerate(names):
        t = torch.ones(shapes[name], dtype=torch.bfloat16) if name.endswith("norm.weight") else \
            (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
        current[name] = t
        size += t.numel() * 2
        if size >= shard_bytes or i == len(names) - 1:  # write the shard and let it go
            n_shards += 1
            file = f"model-{n_shards:05d}.safetensors"
            tensorfile.write(current, out / file, {"format": "pt"})
            weight_map.update({k: file for k in current})
            current, size = {}, 0
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def copy_bandwidth(n_bytes: int = 2**30) -> float:
    """Bytes per second read by a large copy (read + write counted as the bytes read)."""
    a = torch.empty(n_bytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    return 3 * n_bytes / (time.perf_counter() - t0)


def read_bandwidth(n_bytes: int = 2**30, reps: int = 5) -> float:
    """Bytes per second read by a sum over a large tensor (all threads), the best of `reps`: what a decode
    step does with its weights."""
    a = torch.ones(n_bytes // 4)
    a.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def bytes_per_token(cfg: ModelConfig, model_bytes: int, dtype_bytes: float, embed_bytes: float = 2) -> float:
    """Weights one decode step reads: all but the embedding table, and only top_k of n_experts experts."""
    embed = cfg.vocab_size * cfg.d_model * embed_bytes  # ours keeps it bf16 (not quantized); GGUF quantizes it
    if not cfg.is_moe:
        return model_bytes - embed
    experts = 3 * cfg.n_experts * cfg.d_ff * cfg.d_model * cfg.n_layers * dtype_bytes
    return model_bytes - embed - experts * (1 - cfg.top_k / cfg.n_experts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="mistral-7b")
    ap.add_argument("--dir", required=True, help="where to write the checkpoint (many GB)")
    ap.add_argument("--modes", default="bf16,int8,int4",
                    help="bf16, int8, int4 (load, then decode); quantize-8, quantize-4 (the `quantize` command); "
                         "llama-q8_0, llama-q4_0 (llama.cpp decoding the GGUF export)")
    ap.add_argument("--tokens", type=int, default=8, help="decode tokens per measurement (0: load only)")
    ap.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    ap.add_argument("--out", default=None)
    ap.add_argument("--delete", action="store_true", help="remove the checkpoint afterwards")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    path = Path(args.dir) / args.shape
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        write_checkpoint(cfg, path)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    bw = read_bandwidth()
    result = {"shape": args.shape, "config": cfg.to_hf_dict(), "threads": torch.get_num_threads(),
              "read_GB_s": bw / 1e9, "copy_GB_s": copy_bandwidth() / 1e9,
              "disk_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")), "runs": []}
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for mode in args.modes.split(","):
        target = path
        if mode.startswith("llama-"):
            target = Path(args.dir) / f"{args.shape}-{mode[6:]}.gguf"
            if not target.exists():
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", EXPORT, str(path), str(target), mode[6:]], env=env, check=True)
                print(f"exported {target} in {time.perf_counter() - t0:.0f} s", flush=True)
        for compiled in ([False, True] if args.compile and mode in ("bf16", "int8", "int4") else [False]):
            r = subprocess.run([sys.executable, "-c", CHILD, str(target), mode, str(args.tokens), str(int(compiled))],
                               capture_output=True, text=True, env=env)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            width = {"bf16": 2, "int8": 1, "int4": 0.5, "llama-q8_0": 34 / 32, "llama-q4_0": 18 / 32}.get(mode)
            if mode.startswith("llama-"):
                row["model_bytes"] = target.stat().st_size
            if width and "decode_tok_s" in row:
                embed = width if mode.startswith("llama-") else 2
                row["bandwidth_limit_tok_s"] = bw / bytes_per_token(cfg, row["model_bytes"], width, embed)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.delete:
        shutil.rmtree(path)
        for f in Path(args.dir).glob(f"{args.shape}-*.gguf"):
            f.unlink()


if __name__ == "__main__":
    main()
