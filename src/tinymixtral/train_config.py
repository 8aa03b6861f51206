"""The training run's configuration: TrainConfig (one field per `tinymixtral train` flag), the learning-rate
schedule (a pure function of the step and the run's progress), and run.json, the configs a run is resumed from."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import TinyMixtralError


DEFAULT_MAX_STEPS = 1000  # the step limit of a run given no limit at all


@dataclass
class TrainConfig:
    # The comment after each field is its --flag's help text (tinymixtral train --help).
    data: str = ""  # a prepared data directory (tinymixtral prepare)
    out: str = "runs/demo"  # the run directory
    batch_size: int = 16  # sequences per micro-batch (per process)
    seq_len: int = 256  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW for embeddings, head, norms, router)
    lr: float = 3e-3  # peak learning rate (after warmup); with --optimizer muon, AdamW's
    muon_lr: float = 0.02  # Muon's peak learning rate (with --optimizer muon)
    router_lr: float | None = None  # the MoE router's peak learning rate (default: --lr)
    muon_experts: bool = True  # with --optimizer muon: Muon for the MoE experts too (false: AdamW, which costs less)
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, then a linear decay over --decay-fraction of the run)
    decay_fraction: float = 0.2  # wsd: the last part of the run (steps, tokens or time) over which lr decays
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup steps
    max_steps: int | None = None  # stop after this many optimizer steps (default: 1000 if no --max-tokens/--max-time)
    max_tokens: int | None = None  # stop after this many training tokens (all processes)
    max_time: float | None = None  # stop after this many seconds of training (600, 10m, 1h)
    weight_decay: float = 0.1  # AdamW weight decay of matrices (not of embeddings, norms or biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    dropout: float = 0.0  # dropout on the embeddings and each block's attention and FFN outputs, in training only
    dropout_after: float = 0.0  # --dropout starts after this many passes over the training split (0: from the start)
    ffn_dropout: float = 0.0  # dropout on each FFN's hidden layer (each expert's in an MoE), with --dropout's start
    grad_clip: float = 1.0  # clip the global gradient norm to this
    skip_nonfinite: int = 0  # steps with a NaN/inf loss or gradient norm to skip, with a warning (0: stop at the first)
    eval_interval: int = 200  # estimate the val loss every this many steps (and keep the best checkpoint)
    eval_batches: int = 20  # batches of val windows, spread over the split, in each estimate
    log_interval: int = 10  # write a metrics row every this many steps
    ckpt_interval: int = 500  # save a checkpoint every this many steps
    keep_last: int = 2  # checkpoints kept besides the best
    seed: int = 1337  # seed of the initialisation and of the batches
    device: str | None = None  # default: cuda when available
    autocast: str = "none"  # none | bf16 | fp16 (a GradScaler) | auto: bf16 where the device has native bf16, else none
    compile: bool | str = "auto"  # torch.compile the model: auto (runs of 2+ min or 300+ steps, one process) | true | false
    wandb: bool = False  # log to Weights & Biases (pip install wandb)
    wandb_project: str = "tinymixtral"  # the W&B project
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of DDP
    fsdp_bf16: bool = False  # with --fsdp: bf16 parameters in forward and backward, fp32 gradient reduction (for GPUs)
    progress: bool = True  # show a progress bar
    init_from: str | None = None  # start from this model directory's weights and config (fine-tuning)
    train_only: str = "all"  # router | experts | attention | all: train these parameters, freeze the rest

    def __post_init__(self):
        # A run needs a limit; a time or token limit is not cut short by a step count nobody asked for.
        if self.max_steps is None and self.max_tokens is None and self.max_time is None:
            self.max_steps = DEFAULT_MAX_STEPS


# Named recipes for `train --recipe NAME` (default: "default"): a model preset and TrainConfig values, under the flags
# given. "default" is the tuned recipe over TrainConfig's defaults (a fine-tune, --init-from without --recipe, keeps
# TrainConfig's own: AdamW, cosine); "demo" is the main job's (run.py demo). benchmarks/recipe_search.py measures
# candidates; the tuned values go here.
# The tuned recipe (README, "Equal time"): Muon for the hidden matrices (AdamW at lr for the rest), warmup-stable-decay,
# batch 16 x 256, a short warmup, bf16 autocast where the device has native bf16 products: on War and Peace after 8
# minutes on 2 cores (an AVX512-BF16 CPU), 15.8 % lower val bits per byte than the earlier AdamW + cosine, batch 8
# fp32 recipe (9.7 % with the new recipe in fp32, on a slower day). Dropout 0.1 once the run repeats its data
# (War and Peace's 837K tokens are seen ~4.5 times in 8 minutes, and the model overfits them): the MoE 2.3 % lower
# val bits per byte, its dense twin 2.2 % (3 seeds each). A run that never finishes a pass (the demo) trains as without it.
TUNED = dict(optimizer="muon", muon_lr=0.02, schedule="wsd", batch_size=16, seq_len=256, lr=4e-3, warmup_steps=20,
             autocast="auto", dropout=0.1, dropout_after=1.0)
RECIPES = {
    "default": dict(preset="demo", **TUNED),
    "demo": dict(preset="demo", **TUNED, eval_interval=250, eval_batches=10, ckpt_interval=1000),
}


def get_lr(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, times the schedule from 1 to min_lr_ratio over progress 0..1:
    a cosine, or (wsd) 1 until the last decay_fraction of the run, then a straight line down.

    progress is whichever limit binds (steps, tokens or seconds), so under --max-time the decay starts
    when the time left says so."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    x = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "wsd":
        shape = min(1.0, (1.0 - x) / cfg.decay_fraction) if cfg.decay_fraction > 0 else 1.0
    else:
        shape = 0.5 * (1 + math.cos(math.pi * x))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def save_run_config(out: Path, tcfg: TrainConfig, mcfg: ModelConfig):
    try:
        (out / "run.json").write_text(json.dumps(
            {"train": dataclasses.asdict(tcfg), "model": dataclasses.asdict(mcfg)}, indent=2) + "\n")
    except OSError as e:
        raise TinyMixtralError(f"cannot write {out / 'run.json'}: {e.strerror or e}") from None


def load_run_config(run_dir: Path) -> tuple[TrainConfig, ModelConfig]:
    path = run_dir / "run.json"
    if not path.is_file():
        raise TinyMixtralError(f"{run_dir} is not a training run (no run.json)")
    d = json.loads(path.read_text())
    return TrainConfig(**d["train"]), ModelConfig(**d["model"])
