"""The README's worked example, end to end on the command line: two ways to make and train an MoE from a
dense model, each measured against the dense model trained for the same time.

    python benchmarks/worked_example.py --work /tmp/example --minutes 3

Data: the project's synthetic stories mixed with arithmetic sentences ("12 + 7 = 19."), one byte-level BPE.
0. base: a dense `demo`-shaped model (--n-experts 0, FFN 512) trained on the mix for `--base-minutes`.
A. upcycle the base to 4 experts top-2 (noise 0.01) -> train on the mix for M minutes -> eval;
   against: the base trained on for the same M minutes.
B. fine-tune the base's FFN (--train-only experts) on stories alone and on arithmetic alone (M/2 minutes
   each) -> merge them with `gate_mode: random` (2 experts, top-2) -> train the router only on the mix
   (M/2 minutes) -> routes on each domain's val text; against: the base trained on the mix for the same 3M/2 minutes.
Every command is printed as it runs and stored in the result JSON. Timings depend on the machine's load.
A rerun with the same --work skips the steps whose output is already there.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tinymixtral.data import DOC_SEPARATOR
from tinymixtral.stories import generate_stories

# AdamW + cosine (the recipe before Muon + WSD became the default), as the recorded result was made.
TRAIN = ["--optimizer", "adamw", "--schedule", "cosine", "--batch-size", "8", "--seq-len", "256", "--lr", "2e-3",
         "--warmup-steps", "20", "--max-steps", "1000000",
         "--eval-interval", "1000000", "--ckpt-interval", "1000000", "--progress", "false"]
commands: list[str] = []


def tm(*args, makes: Path | None = None) -> str:
    """Run `tinymixtral ARGS` (unless `makes` already exists), print and record the command, return its stdout."""
    cmd = ["tinymixtral", *map(str, args)]
    commands.append(" ".join(cmd))
    print("$ " + commands[-1], flush=True)
    if makes is not None and makes.exists():
        return ""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tinymixtral", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {commands[-1]}\n{r.stderr}")
    print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "", f"[{time.perf_counter() - t0:.0f} s]")
    return r.stdout


def arithmetic(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        sums = []
        for _ in range(r.randint(3, 8)):
            a, b, op = r.randint(0, 99), r.randint(0, 99), r.choice("+-*")
            sums.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}.")
        docs.append(" ".join(sums))
    return docs


def write(path: Path, docs: list[str]) -> Path:
    path.write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n", encoding="utf-8")
    return path


def evaluate(model: Path, data: Path) -> float:
    """Val loss on (up to) 16 windows of 512 tokens spread over the split."""
    return json.loads(tm("eval", "--model", model, "--data", data, "--json", "--max-batches", "2"))["loss"]


def train(out: Path, data: Path, minutes: float, *extra) -> dict:
    """Train for `minutes`; steps, tokens and the final loss on the whole val split of `data`."""
    if out.exists() and not (out / "latest").exists():
        shutil.rmtree(out)  # an interrupted earlier attempt
    tm("train", "--data", data, "--out", out, "--max-time", f"{minutes * 60:.0f}", *TRAIN, *extra,
       makes=out / "latest")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": rows[-1]["step"], "tokens": rows[-1]["tokens"], "minutes": minutes,
            "val_loss": rows[-1]["final_val_loss"], "val_bpb": rows[-1]["final_val_bpb"]}


def first_choice_share(model: Path, data: Path) -> list[float]:
    """Per expert: the share of tokens (all layers together) whose first choice it is."""
    stats = json.loads(tm("routes", "--model", model, "--data", data, "--json", "--max-tokens", "2048"))
    counts = [sum(lay["first_choice"][e] for lay in stats["layers"]) for e in range(stats["n_experts"])]
    return [c / sum(counts) for c in counts]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a scratch directory")
    ap.add_argument("--minutes", type=float, default=3.0, help="M: training time of each compared route")
    ap.add_argument("--base-minutes", type=float, default=4.0)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args()
    w, m = Path(args.work), args.minutes
    w.mkdir(parents=True, exist_ok=True)
    stories, sums = generate_stories(12_000, seed=1), arithmetic(6_000, seed=1)
    val = ["--val-fraction", "0.01"]
    tm("prepare", write(w / "mix.txt", stories + sums), "--out", w / "mix", "--tokenizer", "bpe:2048", *val,
       makes=w / "mix")
    for name, docs in (("stories", stories), ("sums", sums)):
        tm("prepare", write(w / f"{name}.txt", docs), "--out", w / name, "--tokenizer", w / "mix" / "tokenizer", *val,
           makes=w / name)
    res = {"minutes": m}
    res["base"] = train(w / "base", w / "mix", args.base_minutes, "--preset", "demo", "--n-experts", "0")
    base = w / "base" / "latest"
    # A: upcycling, against the base trained on for the same time
    tm("upcycle", "--model", base, "--experts", "4", "--top-k", "2", "--noise", "0.01", "--out", w / "up",
       makes=w / "up")
    res["A_moe"] = train(w / "A-moe", w / "mix", m, "--init-from", w / "up")
    res["A_dense"] = train(w / "A-dense", w / "mix", m, "--init-from", base)
    # B: merge two fine-tunes with random gates, train the router alone
    # FFN only: the merge keeps the base's attention, norms and embeddings (mergekit's base_model), so an
    # expert is only worth routing to if it was trained against them.
    ft = ("--init-from", base, "--train-only", "experts")
    res["B_ft_stories"] = train(w / "ft-stories", w / "stories", m / 2, *ft)
    res["B_ft_sums"] = train(w / "ft-sums", w / "sums", m / 2, *ft)
    (w / "moe.yaml").write_text(
        f"base_model: {base}\ngate_mode: random\ndtype: float32\nexperts_per_token: 2\nexperts:\n"
        f"  - source_model: {w / 'ft-stories' / 'latest'}\n  - source_model: {w / 'ft-sums' / 'latest'}\n")
    tm("merge", w / "moe.yaml", "--out", w / "merged", makes=w / "merged")
    res["B_routes_before"] = {d: first_choice_share(w / "merged", w / d) for d in ("stories", "sums")}
    res["B_router"] = train(w / "B-router", w / "mix", m / 2, "--init-from", w / "merged", "--train-only", "router")
    res["B_dense"] = train(w / "B-dense", w / "mix", 1.5 * m, "--init-from", base)
    res["B_routes_after"] = {d: first_choice_share(w / "B-router" / "latest", w / d) for d in ("stories", "sums")}
    for k, d in (("B_router", "B-router"), ("B_dense", "B-dense"), ("B_ft_stories", "ft-stories"),
                 ("B_ft_sums", "ft-sums")):
        res[k]["domain_loss"] = {s: evaluate(w / d / "latest", w / s) for s in ("stories", "sums")}
    res["commands"] = commands
    print(json.dumps({k: v for k, v in res.items() if k != "commands"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
