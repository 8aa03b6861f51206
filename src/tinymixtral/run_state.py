"""A training run on disk: run.json, metrics.jsonl, checkpoints/step-N/ (a HF model directory plus the
trainer state), and the `latest` / `best` pointers. No pickles: optimizer moments and RNG states are
safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
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
    partial = ckpts / f".step-{step}.partial"
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
        raise TinyMixtralError(f"{run_dir} has no checkpoint to resume from (no 'latest')")
    return link.resolve()


def append_metrics(run_dir: Path, row: dict):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TinyMixtralError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
