"""Build docs/TOUR.md from docs/tour.src.md: quote the code, run the commands, draw the pictures.

    python docs/build_tour.py             # run every command of the tour (~15 min on 2 cores), draw, write TOUR.md
    python docs/build_tour.py --quote     # re-quote the code excerpts only; keep the recorded outputs and pictures
    python docs/build_tour.py --missing   # run only commands that have no recorded output yet (after the full build)
    python docs/build_tour.py --check     # exit 1 when TOUR.md is not what the source, the code and the outputs give

The source is Markdown with three kinds of marker, each alone on its line:

    <!-- excerpt: src/tinymixtral/model/moe.py::Router.forward -->        a function, class, method or assignment
    <!-- excerpt: src/tinymixtral/train.py::train "for micro" .. "r.step += 1" -->   its lines from ... to ...
    <!-- run: tinymixtral params --preset mixtral-8x7b | head -n 9 -->   a command and its real output
    <!-- picture: params -->                                              a PNG drawn here (picture_params)

Excerpts are found by name with `ast`, never by line number, so they survive edits elsewhere in the file;
a renamed or deleted function is an error. Commands run in this process (`tinymixtral ...` through cli.main,
`python docs/tour_demos.py ...` through its main), from the repository root; they write under tour/.
Their outputs are kept in docs/tour_outputs.json, so re-quoting never re-runs them. A command may end in
`| head -n N`, `| tail -n N` or `| grep -E 'REGEX'` (done here, in Python, as the shell would).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import sys
import textwrap
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
SRC, OUT, OUTPUTS = DOCS / "tour.src.md", DOCS / "TOUR.md", DOCS / "tour_outputs.json"
MARKER = re.compile(r"^<!--\s*(excerpt|run|picture):\s*(.*?)\s*-->\s*$")
EXCERPT = re.compile(r'^(\S+?)::(\S+)(?:\s+"(.*?)"\s*\.\.\s*"(.*?)")?$')
BANNER = "<!-- Built by docs/build_tour.py from docs/tour.src.md: edit that file, then rebuild. -->"

# The tour on tiny settings (tests/test_tour.py): the same commands, each one shortened.
TINY = [
    (r"--max-time \S+", "--max-steps 3"),
    (r"--max-steps \d+", "--max-steps 3"),
    (r"--num-stories \d+", "--num-stories 150"),
    (r"--max-new-tokens \d+", "--max-new-tokens 6"),
    (r"--max-tokens \d+", "--max-tokens 256"),
    (r"--new-tokens \d+", "--new-tokens 4"),
    (r"--rounds \d+", "--rounds 1"),
    (r"--tokens \d+", "--tokens 40"),
    (r"--every \d+", "--every 20"),
    (r" --compile\b", ""),
    (r"^(tinymixtral bench [^|]*?)( \|.*)?$", r"\1 --new-tokens 4 --rounds 1 --seq 32\2"),
]


class TourError(Exception):
    pass


# ---- excerpts ----------------------------------------------------------------------------------------
def find_node(tree: ast.Module, qualname: str, where: str):
    """The def/class/assignment named `qualname` (dotted through classes) in a parsed module."""
    body, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in body if _name_of(n) == part), None)
        if node is None:
            raise TourError(f"{where}: no function, class or assignment named {qualname!r}")
        body = getattr(node, "body", [])
    return node


def _name_of(node) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def excerpt_lines(spec: str) -> tuple[str, str, list[str]]:
    """(path, name, source lines) of an excerpt marker's spec."""
    m = EXCERPT.match(spec)
    if not m:
        raise TourError(f"bad excerpt marker {spec!r}: want PATH::NAME or PATH::NAME \"from\" .. \"to\"")
    path, name, start, end = m.groups()
    file = ROOT / path
    if not file.is_file():
        raise TourError(f"excerpt {spec!r}: no file {path}")
    text = file.read_text()
    node = find_node(ast.parse(text), name, path)
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lines = text.splitlines()[first - 1:node.end_lineno]
    if start is not None:
        i = next((i for i, line in enumerate(lines) if start in line), None)
        if i is None:
            raise TourError(f"excerpt {spec!r}: {name} has no line with {start!r}")
        j = next((j for j in range(i, len(lines)) if end in lines[j]), None)
        if j is None:
            raise TourError(f"excerpt {spec!r}: {name} has no line with {end!r} after {start!r}")
        lines = lines[i:j + 1]
    return path, name, textwrap.dedent("\n".join(lines)).splitlines()


def render_excerpt(spec: str) -> str:
    path, name, lines = excerpt_lines(spec)
    return f"[`{path}`](../{path}) · `{name}`\n\n```python\n" + "\n".join(lines) + "\n```"


# ---- commands ----------------------------------------------------------------------------------------
def split_pipes(command: str) -> tuple[list[str], list[list[str]]]:
    """argv of the command, and its filters (head/tail/grep argv lists)."""
    parts = [shlex.split(p) for p in re.split(r"\s\|\s", command)]
    for f in parts[1:]:
        if not (f[0] in ("head", "tail") and len(f) == 3 and f[1] == "-n") and not (f[:2] == ["grep", "-E"] and len(f) == 3):
            raise TourError(f"command {command!r}: only '| head -n N', '| tail -n N' and \"| grep -E 'RE'\" filters")
    return parts[0], parts[1:]


def filtered(text: str, filters: list[list[str]]) -> str:
    lines = text.splitlines()
    for f in filters:
        if f[0] == "head":
            lines = lines[:int(f[2])]
        elif f[0] == "tail":
            lines = lines[-int(f[2]):]
        else:
            lines = [line for line in lines if re.search(f[2], line)]
    return "\n".join(lines)


def clean(text: str) -> str:
    """What a terminal shows at the end: the last state of each \\r-rewritten line, no trailing spaces."""
    out = []
    for line in text.split("\n"):  # not splitlines(): it splits at \r too
        line = line.rstrip().split("\r")[-1].rstrip()
        out.append(line)
    return "\n".join(out).strip("\n")


def run_command(command: str, cwd: Path) -> tuple[int, str]:
    """Run one tour command in this process, in `cwd`: (exit status, its output after the filters)."""
    argv, filters = split_pipes(command)
    if argv[0] == "tinymixtral":
        from tinymixtral import cli
        main, args = cli.main, argv[1:]
    elif argv[:2] == ["python", "docs/tour_demos.py"]:
        main, args = demos().main, argv[2:]
    else:
        raise TourError(f"command {command!r}: tour commands start with 'tinymixtral' or 'python docs/tour_demos.py'")
    buf, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                code = main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return code or 0, filtered(clean(buf.getvalue()), filters)


def render_run(command: str, outputs: dict) -> str:
    if command not in outputs:
        raise TourError(f"no recorded output for {command!r}: run docs/build_tour.py without --quote")
    return f"```text\n$ {command}\n{outputs[command]}\n```"


def tiny(command: str) -> str:
    for pattern, repl in TINY:
        command = re.sub(pattern, repl, command)
    return command


def markers(src: str) -> list[tuple[str, str]]:
    return [m.groups() for m in map(MARKER.match, src.splitlines()) if m]


# ---- the document ------------------------------------------------------------------------------------
def render(src: str, outputs: dict) -> str:
    out = [BANNER]
    for line in src.splitlines():
        m = MARKER.match(line)
        if not m:
            out.append(line)
        elif m[1] == "excerpt":
            out.append(render_excerpt(m[2]))
        elif m[1] == "run":
            out.append(render_run(m[2], outputs))
        else:
            name = m[2]
            if name not in PICTURES:
                raise TourError(f"no picture named {name!r} (pictures: {', '.join(PICTURES)})")
            out.append(f"![{PICTURES[name][1]}](tour_{name}.png)")
    return "\n".join(out) + "\n"


def run_all(src: str, cwd: Path, docs: Path, make_tiny: bool = False, log=print, done: dict | None = None) -> dict:
    """Run every command and draw every picture, in order (later commands read what earlier ones wrote).

    done: outputs already recorded; those commands are not run again (nor the pictures already drawn)."""
    resume = bool(done)  # pictures already drawn are kept only when going on from recorded outputs
    outputs = done if done is not None else {}  # filled in place: a caller keeps what ran before an error
    for kind, arg in markers(src):
        if (kind == "run" and arg in outputs) or (resume and kind == "picture" and (docs / f"tour_{arg}.png").is_file()):
            continue
        if kind == "run":
            command = tiny(arg) if make_tiny else arg
            t0 = time.perf_counter()
            code, text = run_command(command, cwd)
            log(f"[{time.perf_counter() - t0:6.1f} s] $ {command}")
            if code != 0:
                raise TourError(f"{command!r} exited with {code}:\n{text}")
            outputs[arg] = text
        elif kind == "picture":
            PICTURES[arg][0](cwd, docs / f"tour_{arg}.png")
            log(f"picture {arg}")
    return outputs


def demos():
    spec = importlib.util.spec_from_file_location("tour_demos", DOCS / "tour_demos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- pictures (drawn from what the commands wrote under tour/, or from the code itself) ------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, out: Path):
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Software": None})  # no version stamp: rebuilt PNGs differ only if the picture does
    plt.close(fig)


def picture_params(cwd: Path, out: Path):
    """Mixtral 8x7B: total vs active parameters by component, next to eight separate Mistral 7Bs."""
    from tinymixtral.config import ModelConfig
    from tinymixtral.params import count_params
    mixtral = count_params(ModelConfig.from_name("mixtral-8x7b"))["components"]
    mistral = count_params(ModelConfig.from_name("mistral-7b"))["components"]
    bars = {
        "8 × Mistral 7B": {c: 8 * v["total"] for c, v in mistral.items()},
        "Mixtral 8x7B: all": {c: v["total"] for c, v in mixtral.items()},
        "Mixtral 8x7B: active per token": {c: v["active"] for c, v in mixtral.items()},
    }
    colors = {"embedding": "#8da0cb", "attention": "#66c2a5", "router": "#e78ac3", "experts": "#fc8d62",
              "ffn": "#fc8d62", "norms": "#a6d854", "head": "#ffd92f"}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 3.0))
    for row, (label, comps) in enumerate(bars.items()):
        left = 0.0
        for c, n in comps.items():
            if n:
                ax.barh(row, n / 1e9, left=left, color=colors[c], edgecolor="white",
                        label=("experts / FFN" if c in ("experts", "ffn") else c) if row == 1 or c == "ffn" else None)
                left += n / 1e9
        ax.text(left + 0.5, row, f"{left:.1f}B", va="center")
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set_xlabel("parameters (billions)")
    ax.set_xlim(0, 66)
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), loc="lower right", fontsize=8, ncol=2)
    _save(fig, plt, out)


def picture_rolling(cwd: Path, out: Path):
    """Which position each slot of a 4-slot rolling buffer holds, step by step (read from a real KVCache)."""
    import torch
    from tinymixtral.build import build_model
    from tinymixtral.cache import KVCache
    from tinymixtral.config import ModelConfig
    torch.manual_seed(0)
    W, steps = 4, 10
    model = build_model(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16,
                                    n_experts=2, top_k=1, sliding_window=W, max_seq_len=64)).eval()
    cache = KVCache.for_model(model, batch=1, max_len=steps)
    held = []
    with torch.no_grad():
        for t in range(steps):
            model(torch.tensor([[t % 16]]), cache=cache, positions_BS=torch.tensor([[t]]))
            held.append(cache.pos[0].tolist())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    newest = [[1.0 if p == t else (0.5 if p >= 0 else 0.0) for p in row] for t, row in enumerate(held)]
    ax.imshow(list(map(list, zip(*newest))), cmap="Blues", vmin=0, vmax=1.4, aspect="auto")
    for t, row in enumerate(held):
        for s, p in enumerate(row):
            ax.text(t, s, "" if p < 0 else str(p), ha="center", va="center", fontsize=10)
    ax.set_xticks(range(steps), [f"t={t}" for t in range(steps)])
    ax.set_yticks(range(W), [f"slot {s}" for s in range(W)])
    ax.set_title(f"KVCache.pos after each decode step, window W = {W} (dark: written this step, slot = t mod W)",
                 fontsize=9)
    _save(fig, plt, out)


def _final_load(run: Path) -> list[list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "expert_load" in r][-1]["expert_load"]


def _load_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "expert_load" in r]


ROUTER_RUNS = {"no balancing loss": "tour/runs/noaux", "load-balancing loss 0.1": "tour/runs/aux"}


def picture_router_load(cwd: Path, out: Path):
    """Final training-batch expert load, layer x expert, without and with the balancing loss."""
    plt = _plt()
    loads = {title: _final_load(cwd / run) for title, run in ROUTER_RUNS.items()}
    fig, axes = plt.subplots(1, len(loads), figsize=(9.5, 2.6))
    for ax, (title, load) in zip(axes, loads.items()):
        im = ax.imshow(load, cmap="viridis", vmin=0, vmax=0.5, aspect="auto")
        for i, row in enumerate(load):
            for e, v in enumerate(row):
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.3 else "k")
        ax.set_title(f"{title} (balanced: {1 / len(load[0]):.3f} each)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(load)))
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of assignments")
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)


def picture_load_over_time(cwd: Path, out: Path):
    """Each expert's share of the assignments in the last layer, as training goes on, without and with the loss."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(ROUTER_RUNS), figsize=(9.5, 2.8), sharey=True)
    for ax, (title, run) in zip(axes, ROUTER_RUNS.items()):
        rows = _load_rows(cwd / run)
        steps = [r["step"] for r in rows]
        n_experts = len(rows[0]["expert_load"][-1])
        for e in range(n_experts):
            ax.plot(steps, [r["expert_load"][-1][e] for r in rows], lw=1.2, label=f"expert {e}")
        ax.axhline(1 / n_experts, color="k", ls=":", lw=1)
        ax.set_title(f"{title}: last layer", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("share of assignments")
    axes[-1].legend(fontsize=6, ncol=2)
    _save(fig, plt, out)


PICTURES = {
    "params": (picture_params, "Mixtral 8x7B's parameters by component: total, active per token, and 8 separate Mistral 7Bs"),
    "rolling": (picture_rolling, "the rolling-buffer KV cache: the position each slot holds after each step"),
    "router_load": (picture_router_load, "expert load per layer and expert, without and with the load-balancing loss"),
    "load_over_time": (picture_load_over_time, "each expert's share of the last layer's assignments during training"),
}


# ---- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quote", action="store_true", help="re-quote the excerpts; keep the recorded outputs")
    mode.add_argument("--check", action="store_true", help="exit 1 when TOUR.md is out of date")
    mode.add_argument("--missing", action="store_true",
                      help="run only the commands without a recorded output (tour/ must hold the earlier ones' files)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    torch.set_num_threads(1)  # the numbers in the tour were taken on one thread of a shared machine
    src = SRC.read_text()
    try:
        if args.check or args.quote:
            outputs = json.loads(OUTPUTS.read_text())
        else:
            outputs = json.loads(OUTPUTS.read_text()) if args.missing else {}
            try:
                run_all(src, ROOT, DOCS, done=outputs)
            finally:  # what ran is kept, even after an error: --missing goes on from there
                kept = {arg: outputs[arg] for kind, arg in markers(src) if kind == "run" and arg in outputs}
                OUTPUTS.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n")
        text = render(src, outputs)
    except TourError as e:
        print(f"build_tour: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if OUT.read_text() != text:
            print("build_tour: docs/TOUR.md is out of date: run python docs/build_tour.py --quote", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
