"""A training run on disk: run.json, metrics.jsonl, checkpoints/step-N/ (a HF model directory plus the
trainer state), and the `latest` / `best` pointers. No pickles: optimizer moments and RNG states are
safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import save_model
from .errors import TinyMixtralError

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
SHARDED = "sharded"  # an FSDP run's model and optimizer shards (torch.distributed.checkpoint), in a checkpoint


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scalars: dict, rng: dict[str, torch.Tensor],
                    tokenizer_dir: Path | None, keep_last: int, best_step: int | None,
                    shards: Path | None = None) -> Path:
    """Write checkpoints/step-N atomically, point `latest` (and `best` if it is the best) at it, and prune
    old ones (never the best). `shards`: a directory already written (an FSDP run's sharded state) that
    moves into the checkpoint as `sharded/`."""
    ckpts = run_dir / "checkpoints"
    final = ckpts / f"step-{step}"
    partial = ckpts / f".step-{step}.partial-{os.getpid()}"  # the PID tells clean_stale whose it is
    try:
        save_model(model, partial, tokenizer=tokenizer_dir)
        tensors, groups = _optimizer_to_flat(optimizer) if optimizer is not None else ({}, [])
        tensors.update({f"rng.{k}": v for k, v in rng.items()})
        save_file(tensors, partial / STATE_TENSORS)
        (partial / STATE_JSON).write_text(json.dumps({**scalars, "step": step, "param_groups": groups}, indent=2))
        if shards is not None:
            os.replace(shards, partial / SHARDED)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except (OSError, TinyMixtralError) as e:  # a full disk, a quota: the half-written checkpoint goes
        shutil.rmtree(partial, ignore_errors=True)
        cause = e if isinstance(e, OSError) else e.__cause__  # save_model's TinyMixtralError says which file
        if not isinstance(cause, OSError):
            raise
        raise TinyMixtralError(f"cannot write the checkpoint {final}: {cause.strerror or cause}; "
                               "the checkpoints written before it are intact") from None
    point(run_dir, "latest", final)
    if best_step == step:
        point(run_dir, "best", final)
    steps = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != best_step:
            shutil.rmtree(ckpts / f"step-{old}", ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the optimizer in place (unless None: a sharded run restores it from `sharded/`); return
    (scalars, rng states)."""
    if not (ckpt / STATE_JSON).is_file() or not (ckpt / STATE_TENSORS).is_file():
        raise TinyMixtralError(f"{ckpt} has no trainer state ({STATE_JSON}, {STATE_TENSORS}); cannot resume from it")
    scalars = json.loads((ckpt / STATE_JSON).read_text())
    tensors = {k: v.clone() for k, v in load_file(ckpt / STATE_TENSORS).items()}  # own memory, not the file's
    state = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    groups = scalars.pop("param_groups")
    if optimizer is not None:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    return scalars, rng


def _optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"opt.{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def point(run_dir: Path, name: str, target: Path):
    """Atomically make run_dir/name a relative symlink to target."""
    link = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, run_dir))
    os.replace(tmp, link)


def latest_checkpoint(run_dir: Path) -> Path:
    link = run_dir / "latest"
    if not link.exists():
        raise TinyMixtralError(f"{run_dir} has no checkpoint to resume from (no 'latest'); "
                               f"start it again with --out {run_dir}")
    return link.resolve()


# .step-N.partial-PID (save_checkpoint) and ..step-N.partial-PID.tmp-PID (save_model inside it). Without a PID:
# .step-N.partial, written by versions that did not record it, and .step-N.sharded.partial, an FSDP run's shards
# before they move into their checkpoint; cleaned at start and resume, before this run writes any.
TEMP_NAME = re.compile(r"^\..+[.-](?:tmp|old|partial)-(\d+)$")
LEGACY_PARTIAL = re.compile(r"^\.step-\d+\.(?:sharded\.)?partial$")


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove the temporary directories that interrupted checkpoint writes left in run_dir/checkpoints, but only
    those of processes no longer alive (another live writer's are kept); returns what was removed."""
    ckpts = run_dir / "checkpoints"
    gone = []
    for p in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        m = TEMP_NAME.match(p.name)
        if (m and not _alive(int(m.group(1)))) or LEGACY_PARTIAL.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a PID we can ask about): leave its files alone
    return True


def start_run_dir(run_dir: Path):
    """Make run_dir ready for a new run. A run that saved a checkpoint is refused (resume it instead); what a run
    that never saved one left (run.json, metrics.jsonl, plots) is replaced, so it never blocks a rerun."""
    if (run_dir / "latest").exists():
        raise TinyMixtralError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise TinyMixtralError(f"{run_dir} is a file, not a run directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinyMixtralError(f"cannot make the run directory {run_dir}: {e.strerror or e}") from None
    clean_stale(run_dir)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def truncate_metrics(run_dir: Path, step: int):
    """Drop the metrics rows logged after `step` (the checkpoint a run resumes from): they will be logged again,
    and readers must see one row per step. A line cut short by a kill is dropped too."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = path.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def append_metrics(run_dir: Path, row: dict):
    """One JSON line per row, strict JSON: a NaN or inf is written as null and its key listed under "nonfinite"."""
    bad = []

    def finite(v, key):
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(key)
            return None
        return [finite(x, key) for x in v] if isinstance(v, (list, tuple)) else v

    row = {k: finite(v, k) for k, v in row.items()}
    if bad:
        row["nonfinite"] = sorted(set(bad))
    try:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
    except OSError as e:
        raise TinyMixtralError(f"cannot write {run_dir / 'metrics.jsonl'}: {e.strerror or e}") from None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TinyMixtralError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
