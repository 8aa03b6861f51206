"""The state of a training run in progress (Run): what train.setup makes, and the loop, its evaluations, its
checkpoints (train_save.py) and its compile (train_compile.py) work with."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .train_config import TrainConfig


@dataclass
class Run:
    """What the loop works with (made by setup): processes, data, model, optimizer and the counters."""

    tcfg: TrainConfig
    mcfg: ModelConfig
    out: Path
    device: str
    rank: int
    world: int
    model: torch.nn.Module  # what the loop calls: the Transformer, or its DDP / FSDP / compiled wrapper
    raw: torch.nn.Module  # the Transformer itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # scales fp16 losses; a pass-through otherwise
    autocast: torch.dtype | None
    train_data: np.ndarray
    val_data: np.ndarray
    meta: dict
    data_gen: torch.Generator
    wandb: object | None
    peak_flops: float  # the matmul rate measured at the start: MFU's denominator
    flops_per_token: float
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training steps (evaluations and checkpoints excluded)
    best_val: float | None = None
    best_step: int | None = None
    nonfinite_skipped: int = 0  # steps whose update was skipped for a NaN/inf loss or gradient norm
    resumed_at: int | None = None  # the step a resumed run starts at: no second eval/checkpoint there
    train_mask: np.ndarray | None = None  # conversations: 1 where a token is trained (data.load_mask)
    val_mask: np.ndarray | None = None
    train_starts: np.ndarray | None = None  # conversations: where training windows start (chats.train_starts)
    compiled: bool = False  # model is torch.compile's wrapper (evaluation runs the eager raw model)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return "RANK" in os.environ  # started by torchrun

    def amp(self):
        """The autocast context of the run's forward passes (a no-op without --autocast)."""
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast) if self.autocast else nullcontext()

    def dropout_now(self) -> tuple[float, float]:
        """(--dropout, --ffn-dropout) once the run has trained on --dropout-after passes over its data (nothing
        unseen can be memorised before), zeros until then: a function of the tokens trained, so a resume keeps it."""
        t = self.tcfg
        return (t.dropout, t.ffn_dropout) if self.tokens >= t.dropout_after * len(self.train_data) else (0.0, 0.0)

    def progress(self) -> float:
        """How far the run is, 0..1, by whichever limit binds: steps, tokens or time."""
        t = self.tcfg
        return max(self.step / t.max_steps if t.max_steps else 0.0, self.tokens / t.max_tokens if t.max_tokens else 0.0,
                   self.elapsed / t.max_time if t.max_time else 0.0)

    def scalars(self) -> dict:
        d = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "best_val": self.best_val,
             "best_step": self.best_step, "nonfinite_skipped": self.nonfinite_skipped}
        return d | ({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {})
