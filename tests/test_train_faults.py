"""`tinymixtral train` when things go wrong: a diverging run (NaN/inf losses and gradients), kills during
checkpoint writes, resumes after them, a full disk, and run directories it cannot make. Each test failed before
issue 16's fixes."""
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tinymixtral.train as T
from conftest import assert_one_line_error, call_cli
from tinymixtral import cli, tensorfile
from tinymixtral import run_state as RS

# TRAIN_CFG's model as flags (vocab 320 over data_dir's 300-token BPE), batch 8 x 32 tokens, no progress bar.
TINY_FLAGS = ["--vocab-size", "320", "--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
              "--d-ff", "64", "--n-experts", "4", "--top-k", "2", "--max-seq-len", "64", "--rope-theta", "1e4",
              "--batch-size", "8", "--seq-len", "32", "--eval-batches", "2", "--log-interval", "1", "--progress",
              "false"]


def tiny_train(capsys, data_dir, out, *flags):
    return call_cli(capsys, "train", "--data", data_dir, "--out", out, *TINY_FLAGS, *flags)


def strict_rows(run):
    """metrics.jsonl read as strict JSON: a bare NaN or Infinity fails."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def finite_weights(ckpt) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(Path(ckpt) / "model.safetensors").values())


# AdamW: at lr 1e6 its update diverges for real (Muon's normalised update of the hidden matrices need not)
DIVERGE = ["--optimizer", "adamw", "--lr", "1e6", "--warmup-steps", "0", "--max-steps", "6", "--eval-interval", "4",
           "--ckpt-interval", "4"]


# ---- a diverging run -----------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_one_line_and_no_checkpoint(tmp_path, data_dir, capsys):
    """lr 1e6 makes the gradient norm NaN within 3 steps (for real, no injection): the run stops there, before
    the update and before any checkpoint; what it left does not block a rerun into the same directory."""
    out = tmp_path / "run"
    err = assert_one_line_error(tiny_train(capsys, data_dir, out, *DIVERGE), "train", 2)
    m = re.search(r"error: step (\d+): loss \S+ and gradient norm nan: training diverged", err)
    assert m and int(m.group(1)) <= 3 and "--skip-nonfinite" in err, err
    assert not (out / "latest").exists() and not (out / "best").exists() and not (out / "checkpoints").exists()
    # strict JSON, and the row of the NaN step was never written
    assert [r["step"] for r in strict_rows(out)] == list(range(1, int(m.group(1))))
    r = tiny_train(capsys, data_dir, out, "--lr", "1e-2", "--max-steps", "2", "--eval-interval", "100")
    assert r.returncode == 0, r.stderr
    rows = strict_rows(out)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2] and rows[0]["lr"] < 1  # the new run's rows only


def test_skip_nonfinite_skips_updates_and_keeps_weights_finite(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    r = tiny_train(capsys, data_dir, out, *DIVERGE, "--skip-nonfinite", "10")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: step")]
    n = len(warnings)
    assert n >= 4 and f"update skipped ({n} of --skip-nonfinite 10)" in warnings[-1]
    rows = [row for row in strict_rows(out) if "loss" in row]
    assert [row["grad_norm"] for row in rows[-n:]] == [None] * n  # the skipped steps' rows: null, flagged
    assert all(row["nonfinite"] == ["grad_norm"] for row in rows[-n:]) and "nonfinite" not in rows[0]
    for ckpt in (out / "checkpoints").iterdir():
        assert finite_weights(ckpt), ckpt
    assert json.loads((out / "latest" / "trainer_state.json").read_text())["nonfinite_skipped"] == n
    # the budget counts over the whole run, across a resume: n used, the next skipped step is one too many
    r = call_cli(capsys, "train", "--resume", out, "--max-steps", "12", "--skip-nonfinite", str(n))
    assert "error: step 7: loss" in assert_one_line_error(r, "train", 2)


def test_best_never_comes_from_a_nan_evaluation(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: math.nan)
    out = tmp_path / "run"
    r = tiny_train(capsys, data_dir, out, "--max-steps", "4", "--eval-interval", "2", "--ckpt-interval", "2")
    assert r.returncode == 0, r.stderr
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert state["best_val"] is None and state["best_step"] is None and not (out / "best").exists()
    evals = [row for row in strict_rows(out) if "val_loss" in row or "final_val_loss" in row]
    assert len(evals) == 3 and all(row["nonfinite"] for row in evals)  # steps 2 and 4, and the final one
    assert evals[0]["val_loss"] is None and evals[0]["val_ppl"] is None


def test_no_checkpoint_is_written_from_nan_weights(tmp_path, data_dir, capsys, monkeypatch):
    """The last guard: were NaN ever to reach the weights (here the step check is switched off), save refuses."""
    monkeypatch.setattr(T, "skip_nonfinite", lambda *a: False)
    out = tmp_path / "run"
    err = assert_one_line_error(tiny_train(capsys, data_dir, out, *DIVERGE), "train", 2)
    assert "step 4: the weights hold NaN or inf; no checkpoint was written (none was saved before)" in err
    assert not (out / "checkpoints").exists() and not (out / "latest").exists()


def test_metrics_rows_are_strict_json(tmp_path):
    row = {"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "load_max_min": [2.0, -math.inf, None]}
    RS.append_metrics(tmp_path, row)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3,
                                "load_max_min": [2.0, None, None], "nonfinite": ["grad_norm", "load_max_min", "loss"]}


# ---- a kill during a checkpoint write, then a resume ---------------------------------------------------------
KILL_AT_STEP_4 = """
import os, signal, sys
import tinymixtral.run_state as RS
from tinymixtral import cli
real = RS.save_file
def save_file(tensors, path, *a, **k):  # the trainer state of step 4: the model files are written already
    if "step-4" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *a, **k)
RS.save_file = save_file
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_resume(tmp_path, data_dir, capsys):
    """kill -9 in the middle of checkpoint step-4 (steps 3 and 4 logged after checkpoint step-2): the resume
    removes the dead writer's partial directory, keeps a live process's, and logs steps 3 and 4 once."""
    out = tmp_path / "run"
    argv = ["train", "--data", data_dir, "--out", out, *TINY_FLAGS, "--max-steps", "6", "--eval-interval", "2",
            "--ckpt-interval", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", KILL_AT_STEP_4, *map(str, argv)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err
    ckpts = out / "checkpoints"
    partial = f".step-4.partial-{child.pid}"
    assert sorted(p.name for p in ckpts.iterdir()) == [partial, "step-2"]
    assert (ckpts / partial / "model.safetensors").is_file()  # a model's size, left behind
    assert [r["step"] for r in strict_rows(out) if "loss" in r] == [1, 2, 3, 4]
    live = ckpts / f"..step-8.partial-{os.getpid()}.tmp-{os.getpid()}"  # a live writer's (this process)
    live.mkdir()
    legacy = ckpts / ".step-6.partial"  # versions before the PID was recorded
    legacy.mkdir()

    r = call_cli(capsys, "train", "--resume", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) == [live.name]
    rows = strict_rows(out)
    train_steps = [row["step"] for row in rows if "loss" in row]
    eval_steps = [row["step"] for row in rows if "val_loss" in row]
    assert train_steps == [1, 2, 3, 4, 5, 6] and eval_steps == [2, 4, 6]  # one row per step


def test_stale_temp_dirs_are_cleaned_at_start_too(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    ckpts = tmp_path / "run" / "checkpoints"
    for name in (f"..step-3.partial.tmp-{pid}", f".step-3.partial-{pid}", f".step-2.old-{pid}", ".step-4.sharded.partial",
                 f".step-5.partial-{os.getpid()}", "step-1x", ".hidden"):
        (ckpts / name).mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    RS.start_run_dir(tmp_path / "run")
    assert sorted(p.name for p in ckpts.iterdir()) == [".hidden", f".step-5.partial-{os.getpid()}", "step-1x"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # a run that never saved a step: replaced


def test_truncate_metrics_drops_later_rows_and_a_cut_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "val_loss": 1}\n{"step": 3}\n{"step": 4, "lo')
    RS.truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2, "val_loss": 1}\n'


# ---- a full disk, and run directories that cannot be made ------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["model", "trainer state"])
def test_a_full_disk_during_a_save_ends_in_one_line_and_leaves_nothing(tmp_path, data_dir, capsys, monkeypatch,
                                                                      where):
    if where == "model":
        monkeypatch.setattr(tensorfile, "write", _enospc)
    else:
        monkeypatch.setattr(RS, "save_file", _enospc)
    out = tmp_path / "run"
    err = assert_one_line_error(tiny_train(capsys, data_dir, out, "--max-steps", "2", "--eval-interval", "100"),
                                "train", 2)
    assert "cannot write the checkpoint" in err and "No space left on device" in err
    assert list((out / "checkpoints").iterdir()) == []  # no partial save, no temp directory
    monkeypatch.undo()
    r = tiny_train(capsys, data_dir, out, "--max-steps", "2", "--eval-interval", "100")  # run.json does not block
    assert r.returncode == 0, r.stderr
    assert (out / "latest").resolve().name == "step-2"


@pytest.mark.parametrize("kind", ["proc", "file", "below a file"])
def test_unusable_out_is_one_line(tmp_path, data_dir, capsys, kind):
    (tmp_path / "f").write_text("x")
    out = {"proc": Path("/proc/x"), "file": tmp_path / "f", "below a file": tmp_path / "f" / "run"}[kind]
    err = assert_one_line_error(tiny_train(capsys, data_dir, out, "--max-steps", "1"), "train", 2)
    assert str(out) in err
    assert (tmp_path / "f").read_text() == "x"


def test_a_refused_lr_leaves_nothing_that_blocks_a_rerun_or_a_resume(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert "--lr must be > 0 and finite" in assert_one_line_error(
        tiny_train(capsys, data_dir, out, "--lr", "nan"), "train", 2)
    assert not out.exists()
    assert tiny_train(capsys, data_dir, out, "--max-steps", "2", "--eval-interval", "100").returncode == 0
    run_json = (out / "run.json").read_text()
    err = assert_one_line_error(call_cli(capsys, "train", "--resume", out, "--lr", "nan", "--max-steps", "3"), "train")
    assert "--lr must be" in err and (out / "run.json").read_text() == run_json
    assert cli.main(["train", "--resume", str(out), "--max-steps", "3"]) == 0
