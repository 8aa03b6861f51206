"""Real-size checkpoints on this machine: load time and peak memory (bf16, int8, int4 on load), and batch-1
decode speed next to its memory-bandwidth limit.

    python benchmarks/scale.py --shape mistral-7b --dir /tmp/scale --out benchmarks/scale.result.json
    python benchmarks/scale.py --shape mixtral-8x7b-8layers --dir /tmp/scale --modes int8,int4,quantize-4

It writes a random-weight bf16 checkpoint with the real shapes (Mistral-7B: 7.24B parameters, 14.5 GB;
Mixtral-8x7B cut to 8 of its 32 layers: ~11.7B parameters with real 14336 x 4096 experts), one tensor
at a time, then runs each measurement in a fresh process and reads its peak from VmHWM (ru_maxrss would
start at this parent's peak). The bandwidth limit is the bytes one decode step must read (every weight
but the embedding; for an MoE, the experts a token uses) over a copy bandwidth measured in the same run.
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


def bytes_per_token(cfg: ModelConfig, model_bytes: int, dtype_bytes: float) -> float:
    """Weights one decode step reads: all but the embedding table, and only top_k of n_experts experts."""
    embed = cfg.vocab_size * cfg.d_model * 2  # stays bf16 (not quantized)
    if not cfg.is_moe:
        return model_bytes - embed
    experts = 3 * cfg.n_experts * cfg.d_ff * cfg.d_model * cfg.n_layers * dtype_bytes
    return model_bytes - embed - experts * (1 - cfg.top_k / cfg.n_experts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="mistral-7b")
    ap.add_argument("--dir", required=True, help="where to write the checkpoint (many GB)")
    ap.add_argument("--modes", default="bf16,int8,int4",
                    help="bf16, int8, int4 (load, then decode); quantize-8, quantize-4 (the `quantize` command)")
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
    bw = copy_bandwidth()
    result = {"shape": args.shape, "config": cfg.to_hf_dict(), "threads": torch.get_num_threads(),
              "copy_GB_s": bw / 1e9, "disk_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
              "runs": []}
    for mode in args.modes.split(","):
        for compiled in ([False, True] if args.compile and not mode.startswith("quantize") else [False]):
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(args.tokens), str(int(compiled))],
                               capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            width = {"bf16": 2, "int8": 1, "int4": 0.5}.get(mode)
            if width and "decode_tok_s" in row:
                row["bandwidth_limit_tok_s"] = bw / bytes_per_token(cfg, row["model_bytes"], width)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.delete:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
