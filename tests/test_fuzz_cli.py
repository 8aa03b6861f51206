"""A fuzz test of the command line: every command, every flag, hostile values.

Each case takes a valid, fast invocation of one command (BASES) and gives one of its flags (or positionals) a value
from the pool of that flag's kind: wrong types, 0, negatives, NaN, inf, huge numbers, empty strings, files of
non-UTF-8 bytes, and paths that are files, directories or missing. The outcome must be success, or exit status 2
with exactly one error line and no traceback (argparse's own errors print its usage lines first, then that one
line); and nothing may be created outside the case's temporary directory.

The cases are drawn with a fixed seed (TINYMIXTRAL_FUZZ_SEED and TINYMIXTRAL_FUZZ_PER_FLAG explore more). A case
still running after WATCHDOG_S seconds accepted its value (e.g. --max-new-tokens 10**20) and is stopped there.
A new command joins by adding its valid invocation to BASES; a test fails for a command without one.
"""
import argparse
import io
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tinymixtral.bench as B
import tinymixtral.train as T
from conftest import DENSE, tiny_model
from tinymixtral import cli, save_model
from tinymixtral.plots import pyplot

# The watchdog's interrupt must never land inside a first import: a module left half-imported in sys.modules
# breaks every later user in this process (matplotlib then fails with KeyError 'PolyCollection:kwdoc').
pyplot()
for _command, _ in cli.COMMANDS.values():
    __import__(_command)
for _optional in ("gguf", "pyarrow.parquet"):
    try:
        __import__(_optional)
    except ImportError:
        pass

SEED = int(os.environ.get("TINYMIXTRAL_FUZZ_SEED", 16))
PER_FLAG = int(os.environ.get("TINYMIXTRAL_FUZZ_PER_FLAG", 2))  # values drawn per flag (every flag, every command)
WATCHDOG_S = 1.5

INTS = ["0", "-1", "-7", "99999999999999999999", "nan", "inf", "1.5", "x", ""]
FLOATS = ["0", "-1", "-0.5", "nan", "inf", "-inf", "1e308", "x", ""]
STRINGS = ["", "-1", "nan", "x y", "{missing}", "{file}", "{bad_utf8}", "{empty}", "{dir}", "{bad_model}"]
BOOLS = ["", "maybe", "2", "true", "false"]


class Overtime(BaseException):
    """Raised by the watchdog in a case that runs too long (not an Exception: no command may catch it)."""


class World:
    """The files the cases point at, made once: a tiny MoE and a dense model (with the data's tokenizer), prepared
    data, a run with metrics, a merge YAML and a text file. None of them is ever a case's hostile value."""

    def __init__(self, root: Path, data_dir: Path):
        self.root = root
        tok = data_dir / "tokenizer"
        self.data = data_dir
        self.model = save_model(tiny_model(vocab_size=320, max_seq_len=64), root / "model", tokenizer=tok)
        self.dense = save_model(tiny_model(DENSE, seed=1, vocab_size=320, max_seq_len=64), root / "dense",
                                tokenizer=tok)
        self.run = root / "run"
        self.run.mkdir()
        (self.run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "lr": 0.001}\n'
                                                '{"step": 2, "loss": 4.0, "lr": 0.001, "val_loss": 4.5}\n')
        self.yaml = root / "merge.yaml"
        self.yaml.write_text(yaml.safe_dump({
            "base_model": str(self.dense), "gate_mode": "random", "dtype": "float32", "experts_per_token": 1,
            "experts": [{"source_model": str(self.dense), "positive_prompts": ["the cat"]},
                        {"source_model": str(self.dense), "positive_prompts": ["1 + 2"]}]}))
        self.text = root / "corpus.txt"
        self.text.write_text("Tom ran to the park.\n<|endoftext|>\nLily found a red ball.\n" * 20)
        self.n = 0

    def new(self, name: str) -> str:
        """A fresh path (not there yet) for a command's output."""
        self.n += 1
        return str(self.root / "out" / f"{name}-{self.n}")


def hostile_paths(root: Path) -> dict[str, Path]:
    """Fresh for each case (a case may replace or fill them): a text file, non-UTF-8 bytes, an empty file, an empty
    directory, a model directory whose config.json is not UTF-8, and a path that does not exist."""
    root.mkdir()
    (root / "file").write_text("hello\n")
    (root / "bad_utf8").write_bytes(b"\xff\xfe\x80 not utf-8 \xc3\x28\n")
    (root / "empty").write_bytes(b"")
    (root / "dir").mkdir()
    (root / "bad_model").mkdir()
    (root / "bad_model" / "config.json").write_bytes(b"\xff\xfe{not utf-8")
    (root / "bad_model" / "model.safetensors").write_bytes(b"\x00" * 16)
    return {name: root / name for name in ("missing", "file", "bad_utf8", "empty", "dir", "bad_model")}


TINY_TRAIN = {"--vocab-size": "320", "--d-model": "32", "--n-layers": "1", "--n-heads": "2", "--n-kv-heads": "1",
              "--d-ff": "32", "--n-experts": "2", "--top-k": "1", "--max-seq-len": "32", "--batch-size": "2",
              "--seq-len": "8", "--max-steps": "1", "--eval-interval": "100", "--eval-batches": "1",
              "--log-interval": "1", "--progress": "false", "--device": "cpu"}

# command -> a valid, fast invocation: {positional dest or --flag: value (True: a store_true flag)}
BASES = {
    "params": lambda w: {"--model": w.model},
    "prepare": lambda w: {"source": w.text, "--out": w.new("data"), "--tokenizer": "bpe:260", "--val-fraction": "0.2"},
    "train": lambda w: {"--data": w.data, "--out": w.new("run"), **TINY_TRAIN},
    "eval": lambda w: {"--model": w.model, "--data": w.data, "--seq-len": "16", "--max-batches": "1"},
    "generate": lambda w: {"--model": w.model, "--prompt": "Tom", "--max-new-tokens": "3", "--seed": "0",
                           "--device": "cpu"},
    "chat": lambda w: {"--model": w.model, "--max-new-tokens": "3", "--seed": "0", "--device": "cpu"},
    "convert": lambda w: {"--model": w.model, "--to": "mistral", "--out": w.new("native")},
    "quantize": lambda w: {"--model": w.model, "--bits": "8", "--out": w.new("q8")},
    "plot": lambda w: {"run_dir": w.run},
    "bench": lambda w: {"--model": w.model, "--what": "prefill", "--batch": "1", "--seq": "8", "--rounds": "1",
                        "--decode-batch": "1", "--new-tokens": "2", "--no-hf": True, "--no-compile": True,
                        "--device": "cpu"},
    "routes": lambda w: {"--model": w.model, "--data": w.data, "--max-tokens": "32", "--seq-len": "16"},
    "upcycle": lambda w: {"--model": w.dense, "--experts": "2", "--top-k": "1", "--out": w.new("up")},
    "merge": lambda w: {"config": w.yaml, "--out": w.new("merged")},
    "export": lambda w: {"--model": w.model, "--gguf": w.new("gguf") + ".gguf", "--type": "f16"},
}


# Cases that once ended in a traceback (or deleted what they should not have): always run, whatever the seed.
PINNED = [
    ("train", "--device", "x y"), ("bench", "--device", "cuda:7"), ("generate", "--seed", "99999999999999999999"),
    ("chat", "--seed", "99999999999999999999"), ("chat", "--context", "99999999999999999999"),
    ("chat", "--context", "0"), ("train", "--vocab-size", "99999999999999999999"), ("train", "--init-std", "nan"),
    ("train", "--capacity-factor", "1e308"), ("train", "--batch-size", "99999999999999999999"),
    ("train", "--grad-accum", "99999999999999999999"), ("eval", "--batch-size", "-1"), ("routes", "--out", "{file}"),
    ("routes", "--seq-len", "0"), ("upcycle", "--experts", "99999999999999999999"), ("upcycle", "--out", ""),
    ("convert", "--out", ""), ("merge", "--out", "{bad_utf8}"), ("prepare", "--out", ""),
    ("prepare", "--out", "{file}"), ("prepare", "--out", "{bad_model}"), ("prepare", "--max-docs", "0"),
    ("bench", "--seq", "99999999999999999999"),
]


def command_parser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def pool(action: argparse.Action) -> list[str | bool]:
    """The hostile values of one flag's kind."""
    if action.nargs == 0:  # store_true
        return [True]
    if action.choices is not None:
        return ["", "bogus", *map(str, action.choices)]
    if action.type is int:
        return INTS
    if action.type is float:
        return FLOATS
    if getattr(action.type, "__name__", "") == "_bool":
        return BOOLS
    return STRINGS


def cases() -> list[tuple[str, str, str | bool]]:
    """(command, flag or positional dest, value): PER_FLAG values of every flag of every command, seeded."""
    rng = random.Random(SEED)
    out = []
    for command in cli.COMMANDS:
        for a in command_parser(command)._actions:
            if isinstance(a, argparse._HelpAction) or a.dest == "debug":
                continue
            name = a.option_strings[0] if a.option_strings else a.dest
            values = pool(a)
            out += [(command, name, v) for v in rng.sample(values, min(PER_FLAG, len(values)))]
    return out + [c for c in PINNED if c not in out]


def argv_of(command: str, args: dict, w: World) -> list[str]:
    parser = command_parser(command)
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    argv = [command] + [str(args[d]) for d in positionals if d in args]
    for k, v in args.items():
        if k.startswith("--"):
            argv += [k] if v is True else [f"{k}={v}"]  # --flag=value: a value like -inf stays a value
    return argv


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir):
    return World(tmp_path_factory.mktemp("fuzz"), data_dir)


def test_every_command_has_a_fuzz_base():
    assert set(BASES) == set(cli.COMMANDS)


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if "__pycache__" not in p.parts and ".pytest_cache" not in p.parts}


def _on_alarm(signum, frame):
    raise Overtime


@pytest.mark.parametrize("command,flag,value", cases(), ids=lambda x: str(x)[:40])
def test_fuzz(world, command, flag, value, capsys, monkeypatch, tmp_path):
    w = world
    monkeypatch.chdir(tmp_path)  # relative paths and defaults (runs/demo) land in the case's temp dir
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tom ran\n/exit\n"))  # chat's conversation
    for module in (T, B):  # 0.3 s of timing per train case, and per bench phase
        monkeypatch.setattr(module, "measure_matmul_flops", lambda *a, **k: 1e9)
    monkeypatch.setattr(T, "plot_run", lambda run_dir: [])  # 3 s of matplotlib per train case (`plot` is fuzzed)
    args = BASES[command](w)
    args[flag] = value if value is True else value.format(**hostile_paths(tmp_path / "hostile"))
    argv = argv_of(command, args, w)
    repo = Path(__file__).resolve().parents[1]
    before = _tree(repo / "src") | _tree(repo / "tests") | set(map(str, repo.iterdir()))
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse: usage lines, then one error line
        code = e.code
    except Overtime:
        code = "overtime"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        torch.set_num_threads(1)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out, argv
    after = _tree(repo / "src") | _tree(repo / "tests") | set(map(str, repo.iterdir()))
    assert after == before, (argv, after - before)
    if code in (0, "overtime"):
        return
    assert code == 2, (argv, code, out.err)
    lines = out.err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], (argv, out.err)
    assert errors[0].startswith(f"tinymixtral {command}: error: "), (argv, out.err)
    if not errors[0].startswith(f"tinymixtral {command}: error: argument") and "usage:" not in out.err:
        assert len(lines) == 1, (argv, out.err)  # the project's own errors: one line and nothing else
