"""Honest MoE check: an MoE vs its dense twin of equal ACTIVE parameters, same data, same training time,
several seeds. Reports the val bits per byte of both (mean and spread) and their relative difference.

    python benchmarks/moe_vs_dense.py --data data/wp4096 --minutes 8 --seeds 3
    python benchmarks/moe_vs_dense.py --data data/wp4096 --minutes 8 --seeds 3 --optimizer muon --n-experts 8

Any other flag is a `tinymixtral train` flag for both models (a model field changes the MoE, and the twin
follows it); without --recipe they train the demo recipe (train --recipe demo). The dense twin keeps everything
but the FFN: one SwiGLU of hidden top_k * d_ff (e.g. demo: --n-experts 0 --d-ff 1024), so a token touches as
many FFN weights in both models; the MoE has n_experts / top_k times more to choose from. The runs go through
benchmarks/recipe_search.py (one at a time, MoE and dense alternating seed by seed, a JSON line each in --out).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_search as rs  # noqa: E402

from tinymixtral.config import ModelConfig  # noqa: E402
from tinymixtral.errors import TinyMixtralError  # noqa: E402


def twin_recipes(preset: str, flags: dict) -> list[dict]:
    """The MoE's recipe (the preset under the flags) and its dense twin's."""
    moe = {"name": "moe", "preset": preset, "recipe": "demo"} | flags
    cfg = ModelConfig.from_name(preset)
    n_experts = int(moe.get("n_experts", cfg.n_experts))
    top_k, d_ff = int(moe.get("top_k", cfg.top_k)), int(moe.get("d_ff", cfg.d_ff))
    if n_experts == 0:
        raise TinyMixtralError("the MoE needs experts: --n-experts must be > 0")
    return rs.check_recipes([moe, moe | {"name": "dense", "n_experts": 0, "d_ff": top_k * d_ff}])


def parse_flags(extra: list[str]) -> dict:
    """['--n-experts', '8', '--lr', '3e-3'] -> {'n_experts': '8', 'lr': '3e-3'}: every train flag takes a value."""
    if len(extra) % 2 or not all(a.startswith("--") for a in extra[::2]):
        raise TinyMixtralError(f"train flags must come as --flag value pairs, got {' '.join(extra)}")
    return {a[2:].replace("-", "_"): v for a, v in zip(extra[::2], extra[1::2])}


def compare(rows: list[dict]) -> dict:
    """Both models' summaries, the relative difference of the means (MoE vs dense: < 0 means the MoE is
    better), and the per-seed differences of seeds both finished."""
    stats = {s["name"]: s for s in rs.summarize(rows)}
    if set(stats) != {"moe", "dense"}:
        return {"stats": stats}
    by_seed = {(r["name"], r["seed"]): r["val_bpb"] for r in rows if "error" not in r}
    paired = [by_seed["moe", s] / by_seed["dense", s] - 1 for (name, s) in by_seed if name == "moe"
              and ("dense", s) in by_seed]
    return {"stats": stats, "rel": stats["moe"]["mean"] / stats["dense"]["mean"] - 1, "paired": paired,
            "paired_mean": statistics.fmean(paired),
            "paired_sd": statistics.stdev(paired) if len(paired) > 1 else 0.0}


def report(c: dict) -> str:
    lines = []
    for name in ("moe", "dense"):
        s = c["stats"].get(name)
        if s:
            lines.append(f"{name:<6} val bpb {s['mean']:.4f} ± {s['sd']:.4f} (n={s['n']}, {s['min']:.4f} - "
                         f"{s['max']:.4f})  {s['steps']:,.0f} steps  {s['tokens_per_s']:,.0f} tok/s  "
                         f"{s['total_params']:,} params, {s['active_params']:,} active")
    if "rel" in c:
        lines.append(f"MoE vs dense: {100 * c['rel']:+.2f}% (means); per seed {100 * c['paired_mean']:+.2f}% ± "
                     f"{100 * c['paired_sd']:.2f}% over {len(c['paired'])} seeds (< 0: the MoE is better)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", required=True, help="a prepared data directory")
    ap.add_argument("--preset", default="demo", help="the MoE's preset (default demo)")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time of EACH run (default 8)")
    ap.add_argument("--seeds", default="1", help="a count (3: seeds 1, 2, 3) or a list (1,5,9) (default 1)")
    ap.add_argument("--out", default="moe_vs_dense.jsonl", help="the runs, one JSON line each (appended)")
    ap.add_argument("--eval-seq-len", type=int, default=256, help="evaluation window (0: the training window)")
    ap.add_argument("--summary", default=None, help="also write the comparison as JSON here")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the runs and logs in DIR")
    args, extra = ap.parse_known_args(argv)
    try:
        recipes = twin_recipes(args.preset, parse_flags(extra))
        if not args.minutes > 0:
            raise TinyMixtralError(f"--minutes must be > 0, got {args.minutes}")
        rows = rs.search(recipes, rs.parse_seeds(args.seeds), args.minutes, args.data, args.out,
                         args.eval_seq_len or None, args.keep)
    except (TinyMixtralError, ValueError) as e:
        print(f"moe_vs_dense: error: {e}", file=sys.stderr)
        return 2
    c = compare(rows)
    print(rs.table(rows, baseline="dense"))
    print(report(c))
    if args.summary:
        Path(args.summary).write_text(json.dumps({"settings": vars(args) | {"train_flags": extra},
                                                  "recipes": recipes, **c}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
