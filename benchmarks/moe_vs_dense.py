"""Honest MoE check: the demo MoE vs a dense model with the same ACTIVE parameters, same data, same
wall-clock budget. Reports val loss and bits per byte of both.

    python benchmarks/moe_vs_dense.py --data data/stories --minutes 4

The dense twin keeps everything but the FFN: one SwiGLU of hidden top_k * d_ff, so a token touches
as many FFN weights in both models (the MoE just has n_experts / top_k times more to choose from).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from tinymixtral.config import ModelConfig
from tinymixtral.params import count_params
from tinymixtral.train import TrainConfig, train


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a prepared data directory")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--minutes", type=float, default=4.0, help="training time of EACH model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--out", default=None, help="where to write results.json (default: print only)")
    args = ap.parse_args()
    moe = ModelConfig.from_name(args.preset)
    dense = moe.replace(n_experts=0, d_ff=moe.top_k * moe.d_ff)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in (("moe", moe), ("dense", dense)):
            tcfg = TrainConfig(data=args.data, out=str(Path(tmp) / name), batch_size=args.batch_size,
                               seq_len=args.seq_len, lr=args.lr, warmup_steps=50, max_steps=10**6,
                               max_time=args.minutes * 60, eval_interval=10**6, eval_batches=20,
                               ckpt_interval=10**6)
            final = train(tcfg, cfg)
            c = count_params(cfg)
            rows.append({"model": name, "total_params": c["total"], "active_params": c["active"],
                         "steps": final["step"], "tokens": final["tokens"], "val_loss": final["val_loss"],
                         "val_bpb": final["val_bpb"]})
            shutil.rmtree(tcfg.out, ignore_errors=True)
    print(f"\n{'model':<7}{'total':>12}{'active':>12}{'steps':>8}{'tokens':>12}{'val loss':>10}{'val bpb':>9}")
    for r in rows:
        print(f"{r['model']:<7}{r['total_params']:>12,}{r['active_params']:>12,}{r['steps']:>8}"
              f"{r['tokens']:>12,}{r['val_loss']:>10.4f}{r['val_bpb']:>9.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
