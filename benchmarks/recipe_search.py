"""Which training recipe reaches the lowest val bits per byte in a fixed training time?

    python benchmarks/recipe_search.py --data data/wp4096 --recipes recipes.json --minutes 8 --seeds 3 \\
        --out benchmarks/recipe_search.jsonl

A recipe is a dict (a JSON list of them, or a .py file defining RECIPES): "name" (its label), optionally
"recipe" (a named recipe of `train --recipe`), "preset" or "config", any ModelConfig field (d_model, n_layers,
n_experts, top_k, d_ff, n_heads, n_kv_heads, router_aux_loss_coef, ...), any TrainConfig field (optimizer, lr,
muon_lr, schedule, decay_fraction, batch_size, seq_len, warmup_steps, ...), and "data" (a prepared data
directory instead of --data: the data fix the tokenizer, so the vocabulary). A recipe without "recipe" starts from
`train`'s default (Muon + WSD since the search). The earlier recipe, the baseline of the README's table:

    {"name": "before", "preset": "demo", "optimizer": "adamw", "schedule": "cosine", "batch_size": 8, "seq_len": 256,
     "lr": 4e-3, "warmup_steps": 50}

Each recipe trains for --minutes of `tinymixtral train --max-time` (training steps only; evaluations and
checkpoints are not counted) once per seed, one run at a time. The whole val split of the final model is read
in windows of --eval-seq-len tokens for every recipe, so a longer training window is not also a longer
evaluation context: that is the run's own final pass when its --seq-len is the same, else `tinymixtral eval`.
Each result is appended to --out as one JSON line when it is known: a killed search keeps what it finished,
and running it again skips the (recipe, seed) pairs --out holds.
The search ends with a markdown table, mean and spread per recipe; --report prints that table for a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from tinymixtral.config import ModelConfig
from tinymixtral.errors import TinyMixtralError
from tinymixtral.params import count_params
from tinymixtral.train import TrainConfig

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
OWN_KEYS = {"name", "recipe", "preset", "config", "data"}
SEARCH_SETS = {"data", "out", "max_time", "seed", "progress"}  # the search's own: not a recipe's to choose
# A search reads its final model: no evaluation or checkpoint in between costs wall time (a recipe may set them).
QUIET = {"eval_interval": 10**9, "ckpt_interval": 10**9, "log_interval": 50}


# ---- recipes -------------------------------------------------------------------------------------------------
def load_recipes(path: str | Path) -> list[dict]:
    """The recipes of a .json file (a list of dicts) or a .py file (its RECIPES list), checked."""
    path = Path(path)
    if not path.is_file():
        raise TinyMixtralError(f"recipes file not found: {path}")
    try:
        recipes = runpy.run_path(str(path)).get("RECIPES") if path.suffix == ".py" else json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TinyMixtralError(f"{path} is not JSON: {e}") from None
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, dict) for r in recipes):
        raise TinyMixtralError(f"{path} must hold a non-empty list of dicts (a .py file: RECIPES = [...])")
    return check_recipes(recipes)


def check_recipes(recipes: list[dict]) -> list[dict]:
    """Recipes with a name each (given, or made from their values); unknown or search-owned keys refused."""
    out = []
    for r in recipes:
        for k in r:
            if k in SEARCH_SETS - {"data"}:
                raise TinyMixtralError(f"recipe key {k!r} is set by the search (--minutes, --seeds), not a recipe")
            if k not in TRAIN_FIELDS | MODEL_FIELDS | OWN_KEYS:
                raise TinyMixtralError(f"unknown recipe key {k!r}: a TrainConfig or ModelConfig field, or one of "
                                       f"{', '.join(sorted(OWN_KEYS))}")
        out.append({"name": r.get("name") or recipe_name(r), **r})
    names = [r["name"] for r in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise TinyMixtralError(f"two recipes are named {dup!r}; names must be unique")
    return out


def recipe_name(recipe: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in recipe.items() if k not in ("name", "data")) or "default"


def train_flags(recipe: dict) -> list[str]:
    """The recipe as `tinymixtral train` flags (after QUIET, so a recipe's own intervals win)."""
    values = {k: v for k, v in (QUIET | recipe).items() if k not in ("name", "data")}
    flags = []
    for k, v in values.items():
        flags += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    return flags


def parse_seeds(text: str) -> list[int]:
    """'3' -> seeds 1, 2, 3; '1,5,9' -> those."""
    try:
        seeds = [int(s) for s in text.split(",")] if "," in text else list(range(1, int(text) + 1))
    except ValueError:
        raise TinyMixtralError(f"--seeds must be a count (3) or a list (1,5,9), got {text!r}") from None
    if not seeds:
        raise TinyMixtralError(f"--seeds gives no seed: {text!r}")
    return seeds


# ---- one run -------------------------------------------------------------------------------------------------
def tm(*args) -> list[str]:
    return [sys.executable, "-m", "tinymixtral", *map(str, args)]


def run_recipe(recipe: dict, seed: int, minutes: float, data: str, work: Path, eval_seq_len: int | None = 256,
               keep: bool = False) -> dict:
    """Train one recipe for `minutes` with one seed, evaluate its final model on the whole val split: a result row.

    A failed step gives a row with "error" (the last line the command printed) instead of the numbers."""
    data = str(recipe.get("data", data))
    run = work / f"{_slug(recipe['name'])}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    row = {"name": recipe["name"], "seed": seed, "minutes": minutes, "data": data,
           "recipe": {k: v for k, v in recipe.items() if k != "name"}}
    t0 = time.perf_counter()
    log = work / f"{run.name}.log"
    train = _call(tm("train", "--data", data, "--out", run, "--max-time", minutes * 60, "--seed", seed,
                     "--progress", "false", *train_flags(recipe)), log)
    row["wall_train_s"] = time.perf_counter() - t0
    if train:
        return row | {"error": f"train: {train}", "wall_s": row["wall_train_s"]}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [m for m in metrics if "loss" in m][-1]
    final = [m for m in metrics if "final_val_bpb" in m][-1]
    config = json.loads((run / "run.json").read_text())
    mcfg = ModelConfig(**config["model"])
    counts = count_params(mcfg)
    row |= {"steps": last["step"], "tokens": last["tokens"], "train_s": last["elapsed"],
            "tokens_per_s": last["tokens"] / last["elapsed"], "total_params": counts["total"],
            "active_params": counts["active"], "vocab_size": mcfg.vocab_size,
            "train_val_bpb": final["final_val_bpb"], "train_val_loss": final["final_val_loss"]}
    if eval_seq_len in (None, config["train"]["seq_len"]):  # the run's own final pass read exactly these windows
        row |= {"val_loss": final["final_val_loss"], "val_bpb": final["final_val_bpb"],
                "val_tokens": final["val_tokens"], "eval_seq_len": config["train"]["seq_len"]}
    else:
        out = work / f"{run.name}.eval.json"
        err = _call(tm("eval", "--model", run / "latest", "--data", data, "--seq-len", eval_seq_len, "--json"),
                    out, stderr_to=log)
        if err:
            row["error"] = f"eval: {err}"
        else:
            ev = json.loads(out.read_text().strip().splitlines()[-1])
            row |= {"val_loss": ev["loss"], "val_bpb": ev["bpb"], "val_tokens": ev["tokens"],
                    "eval_seq_len": eval_seq_len}
        out.unlink(missing_ok=True)
    row["wall_s"] = time.perf_counter() - t0
    row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not keep:
        shutil.rmtree(run, ignore_errors=True)
        log.unlink(missing_ok=True)
    return row


def _call(cmd: list[str], out: Path, stderr_to: Path | None = None) -> str | None:
    """Run cmd with stdout to `out` (stderr too, or appended to stderr_to); None, or its last line on failure."""
    with open(out, "w") as f, open(stderr_to, "a") if stderr_to else f as e:
        code = subprocess.run(cmd, stdout=f, stderr=e).returncode
    if code == 0:
        return None
    lines = [line for line in Path(stderr_to or out).read_text().splitlines() if line.strip()]
    return (lines[-1] if lines else "") + f" (exit {code})"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)[:80]


# ---- results -------------------------------------------------------------------------------------------------
def read_results(path: str | Path) -> list[dict]:
    """The rows of a results file (a line cut by a kill is skipped)."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_result(path: str | Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summarize(rows: list[dict], baseline: str | None = None) -> list[dict]:
    """Per recipe name: n, mean, sd and range of val bpb, means of steps and tokens/s; sorted, best first.
    rel: the mean's relative difference to the baseline's (default: the first recipe's)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r and r.get("val_bpb") is not None:
            groups.setdefault(r["name"], []).append(r)
    if not groups:
        return []
    base = baseline if baseline in groups else next(iter(groups))
    stats = []
    for name, rs in groups.items():
        bpb = [r["val_bpb"] for r in rs]
        stats.append({"name": name, "n": len(rs), "mean": statistics.fmean(bpb),
                      "sd": statistics.stdev(bpb) if len(bpb) > 1 else 0.0, "min": min(bpb), "max": max(bpb),
                      "steps": statistics.fmean(r["steps"] for r in rs),
                      "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs),
                      "total_params": rs[0]["total_params"], "active_params": rs[0]["active_params"],
                      "baseline": name == base})
    ref = next(s["mean"] for s in stats if s["baseline"])
    for s in stats:
        s["rel"] = s["mean"] / ref - 1
    return sorted(stats, key=lambda s: s["mean"])


def table(rows: list[dict], baseline: str | None = None) -> str:
    """A markdown table of summarize(rows), and a line per failed run."""
    lines = ["| recipe | seeds | val bpb mean | sd | min - max | vs baseline | steps | tokens/s | params (active) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summarize(rows, baseline):
        rel = "baseline" if s["baseline"] else f"{100 * s['rel']:+.1f}%"
        lines.append(f"| {s['name']} | {s['n']} | {s['mean']:.4f} | {s['sd']:.4f} | {s['min']:.4f} - {s['max']:.4f} "
                     f"| {rel} | {s['steps']:,.0f} | {s['tokens_per_s']:,.0f} | {s['total_params'] / 1e6:.2f}M "
                     f"({s['active_params'] / 1e6:.2f}M) |")
    for r in rows:
        if "error" in r:
            lines.append(f"\nfailed: {r['name']} seed {r['seed']}: {r['error']}")
    return "\n".join(lines)


def run_key(name: str, seed: int, minutes: float, data: str, recipe: dict) -> tuple:
    """What makes two runs the same run: a recipe's name and its exact values, the seed, the time, the data."""
    values = {k: v for k, v in recipe.items() if k != "name"}
    return name, seed, minutes, str(data), json.dumps(values, sort_keys=True)


def row_key(row: dict) -> tuple:
    return run_key(row["name"], row["seed"], row["minutes"], row["data"], row["recipe"])


def done_keys(rows: list[dict]) -> set:
    return {row_key(r) for r in rows if "error" not in r}


# ---- the search ----------------------------------------------------------------------------------------------
def search(recipes: list[dict], seeds: list[int], minutes: float, data: str, out: str | Path,
           eval_seq_len: int | None = 256, keep: str | None = None) -> list[dict]:
    """Every (recipe, seed) not yet in `out`, seed by seed (so recipes share the machine's drift), one at a time.
    Returns the rows of `out` that belong to this search (the last row of each run)."""
    keys = {run_key(r["name"], s, minutes, r.get("data", data), r): (r, s) for s in seeds for r in recipes}
    done = done_keys(read_results(out))
    todo = [rs for k, rs in keys.items() if k not in done]
    if len(todo) < len(keys):  # keys, not recipes x seeds: a seed given twice ("3,3") is one run
        print(f"{out} already holds {len(keys) - len(todo)} of these runs: skipped", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="recipe_search.") as tmp:
        work = Path(keep) if keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bar = tqdm(todo, unit="run", dynamic_ncols=True)
        for recipe, seed in bar:
            bar.set_postfix_str(f"{recipe['name']} seed {seed}")
            row = run_recipe(recipe, seed, minutes, data, work, eval_seq_len, keep=bool(keep))
            append_result(out, row)
            what = row.get("error") or f"val bpb {row['val_bpb']:.4f}, {row['steps']} steps, " \
                                       f"{row['tokens_per_s']:,.0f} tok/s"
            tqdm.write(f"{recipe['name']} seed {seed}: {what}")
    mine = {row_key(r): r for r in read_results(out) if row_key(r) in keys}  # a rerun's row replaces a failed one
    return list(mine.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", help="a prepared data directory (tinymixtral prepare)")
    ap.add_argument("--recipes", help="a .json list of recipe dicts, or a .py file defining RECIPES")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time of each run (default 8)")
    ap.add_argument("--seeds", default="1", help="a count (3: seeds 1, 2, 3) or a list (1,5,9) (default 1)")
    ap.add_argument("--out", default="recipe_search.jsonl", help="results, one JSON line per run (appended)")
    ap.add_argument("--eval-seq-len", type=int, default=256,
                    help="evaluation window of every recipe (0: each run's own training window)")
    ap.add_argument("--baseline", default=None, help="the recipe the table compares to (default: the first)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the runs and logs in DIR")
    ap.add_argument("--report", action="store_true", help="only print the table of --out")
    args = ap.parse_args(argv)
    try:
        if args.report:
            if not Path(args.out).is_file():
                raise TinyMixtralError(f"no results file {args.out}")
            print(table(read_results(args.out), args.baseline))
            return 0
        if not args.recipes:
            raise TinyMixtralError("--recipes FILE is needed (or --report)")
        recipes = load_recipes(args.recipes)
        if not args.data and not all("data" in r for r in recipes):
            raise TinyMixtralError("--data DIR is needed (or a \"data\" key in every recipe)")
        if not (args.minutes > 0 and math.isfinite(args.minutes)):
            raise TinyMixtralError(f"--minutes must be > 0, got {args.minutes}")
        rows = search(recipes, parse_seeds(args.seeds), args.minutes, args.data, args.out,
                      args.eval_seq_len or None, args.keep)
    except TinyMixtralError as e:
        print(f"recipe_search: error: {e}", file=sys.stderr)
        return 2
    print(table(rows, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
