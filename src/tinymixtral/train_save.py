"""Writing a training run's checkpoint: the model (gathered in full under FSDP), the trainer state, and under
FSDP each process's shards through torch.distributed.checkpoint. Split from train.py, which calls `save`; `r` is
train.Run, the state of the run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
)

from .build import build_model
from .checkpoint import has_tokenizer
from .errors import TinyMixtralError
from .run_state import SHARDED, save_checkpoint
from .train_config import TrainConfig


def _any_process(r, flag: bool) -> bool:
    """flag on any process (the same answer on all of them, so that they all take the same branch)."""
    if not r.distributed:
        return flag
    t = torch.tensor(float(flag), device=r.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP parameter is a DTensor: its shard


def save(r):
    """A checkpoint of the model and the trainer state; `best` moves to it when it is the best.

    Under FSDP every process also writes its shards of the model and optimizer state with
    torch.distributed.checkpoint (nothing is gathered for them); rank 0 writes the full model as a
    Hugging Face directory for users, then moves the shards into the checkpoint."""
    if _any_process(r, not all(bool(torch.isfinite(_local(p)).all()) for p in r.raw.parameters())):
        latest = r.out / "latest"
        kept = f"the latest is still {latest.resolve().name}" if latest.exists() else "none was saved before"
        raise TinyMixtralError(f"step {r.step}: the weights hold NaN or inf; no checkpoint was written ({kept})")
    sharded = r.distributed and r.tcfg.fsdp
    shards = None
    if sharded:
        shards = r.out / "checkpoints" / f".step-{r.step}.{SHARDED}.partial"
        msd, osd = get_state_dict(r.raw, r.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=shards)  # returns when every process has written
    full = _full_model(r.raw, sharded)  # a collective under FSDP: every process takes part
    if r.master:
        rng = {"data": r.data_gen.get_state(), "torch": torch.get_rng_state()}
        save_checkpoint(r.out, r.step, full, None if sharded else r.optimizer, r.scalars(), rng,
                        tokenizer_dir(r.tcfg), r.tcfg.keep_last, r.best_step, shards=shards)
    if sharded:
        dist.barrier()  # the checkpoint is complete before any process goes on (or is killed)


def tokenizer_dir(tcfg: TrainConfig) -> Path:
    """The tokenizer files checkpoints carry: the --init-from model's (the run's tokenizer is the model's;
    check_tokenizer made sure the data's is the same), else the data's."""
    if tcfg.init_from and has_tokenizer(tcfg.init_from):
        return Path(tcfg.init_from)
    return Path(tcfg.data) / "tokenizer"


def _full_model(model, fsdp: bool):
    """The model with full, unsharded tensors (FSDP shards them across processes)."""
    if not fsdp:
        return model
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:  # with cpu_offload only rank 0 receives the gathered tensors
        return None
    return build_model(model.cfg, sd)
