"""`train --compile`: whether a run trains through torch.compile (`compiles`), and compiling it before the first
step (`compile_model`), so that a failure shows then, and --compile auto falls back to eager training."""

from __future__ import annotations

import time
import warnings

import torch

from .data import get_batch
from .errors import TinyMixtralError, first_line
from .train_config import TrainConfig

# --compile auto compiles a run that lasts at least this long (time, or steps; tokens counted as steps). Compiling
# the demo recipe's step takes ~15-30 s on 2 CPU cores, then the MoE's step runs ~1.2x and its dense twin's ~1.3x
# faster (README, "Train, evaluate, generate").
AUTO_COMPILE_SECONDS, AUTO_COMPILE_STEPS = 120, 300


def compiles(tcfg: TrainConfig, device: str, distributed: bool) -> bool:
    """Whether the run trains through torch.compile: --compile true, or auto for a long enough run of one process
    on a CPU or a CUDA GPU (under torchrun, only when asked)."""
    if tcfg.compile != "auto":
        return bool(tcfg.compile)
    step_tokens = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum
    long = ((tcfg.max_time or 0) >= AUTO_COMPILE_SECONDS or (tcfg.max_steps or 0) >= AUTO_COMPILE_STEPS
            or (tcfg.max_tokens or 0) >= AUTO_COMPILE_STEPS * step_tokens)
    return long and not distributed and torch.device(device).type in ("cpu", "cuda")


def compile_model(r) -> None:
    """r.model (r: a train.Run) through torch.compile, compiled now on one batch of the split's windows (drawn with a
    generator of its own, the run's random state put back after), so that a failure (no C++ compiler, an op inductor
    refuses) shows before the first step: with --compile auto the run goes on eagerly after one warning line. The
    time counts as training time (--max-time includes it)."""
    t0, tcfg = time.perf_counter(), r.tcfg
    compiled = torch.compile(r.model)
    cuda = [torch.device(r.device)] if torch.device(r.device).type == "cuda" else []
    x, y = get_batch(r.train_data, tcfg.batch_size, tcfg.seq_len, torch.Generator().manual_seed(0), r.device,
                     r.rank, r.world, r.train_mask, r.train_starts)
    r.raw.set_dropout(*r.dropout_now())  # as step 1 will
    r.model.train()
    try:
        with torch.random.fork_rng(devices=cuda):  # dropout's draws here leave the run's random state as it was
            with r.amp():
                loss, _ = compiled(x, y)
            loss.backward()
    except Exception as e:  # noqa: BLE001 (any failure: inductor's are many kinds)
        if tcfg.compile is True:
            raise TinyMixtralError(f"torch.compile failed ({first_line(e)}); train with --compile false") from e
        if r.master:
            warnings.warn(f"torch.compile failed ({first_line(e)}); training eagerly", stacklevel=2)
        compiled = None
    finally:
        r.optimizer.zero_grad(set_to_none=True)
    if compiled is not None:
        r.model, r.compiled = compiled, True
    r.elapsed += time.perf_counter() - t0
