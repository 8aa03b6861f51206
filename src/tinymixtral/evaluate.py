"""Loss per token, perplexity and bits per byte of a model on a data split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .build import pick_device
from .checkpoint import load_model
from .data import load_split, window_starts, windows
from .errors import TinyMixtralError


@torch.no_grad()
def evaluate(model, data: np.ndarray, batch: int, seq_len: int, device, max_batches: int | None,
             rank: int = 0, world: int = 1) -> float:
    """Mean next-token loss over evenly spaced, non-overlapping windows of a split (deterministic).

    The windows are those of one process reading batches of batch * world; with world > 1 (torchrun) each
    process reads every world-th of them and the sums are all-reduced, so every process returns the loss of
    the whole set. All processes run the same number of forward passes (a process out of windows runs one
    it does not count), because an FSDP forward is a collective."""
    starts = window_starts(len(data), batch * world, seq_len, max_batches)
    mine = starts[rank::world]
    n_steps = math.ceil(math.ceil(len(starts) / world) / batch)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, token count
    for i in range(n_steps):
        chunk = mine[i * batch:(i + 1) * batch]
        x, y = windows(data, chunk or starts[:1], seq_len, device)
        logits = model(x)
        if chunk:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            total += torch.tensor([loss.item(), y.numel()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def bits_per_byte(loss: float, meta: dict, split: str) -> float:
    """Nats per token -> bits per UTF-8 byte of the text, using the split's token/byte ratio."""
    return loss / math.log(2) * meta[f"{split}_tokens"] / meta[f"{split}_bytes"]


def eval_model(model_dir: str, data_dir: str, split: str = "val", seq_len: int | None = None,
               batch_size: int = 8, max_batches: int | None = None, device: str | None = None,
               dtype: torch.dtype | None = torch.float32, bits: int | None = None,
               group_size: int | None = None) -> dict:
    """{'loss', 'ppl', 'bpb', 'tokens', 'model', ...} of a model directory on a prepared data split.

    'model' is the directory actually read: a run's `best` or `latest` link resolved to its checkpoint."""
    device = pick_device(device)
    data, meta = load_split(data_dir, split)
    model = load_model(model_dir, device=device, dtype=dtype, bits=bits, group_size=group_size)
    if meta["vocab_size"] > model.cfg.vocab_size:
        raise TinyMixtralError(f"the data's tokenizer has {meta['vocab_size']} tokens, the model only "
                               f"{model.cfg.vocab_size}: this data was not prepared for this model")
    if seq_len is None:
        seq_len = min(512, model.cfg.max_seq_len, len(data) - 1)
    elif not 1 <= seq_len <= min(model.cfg.max_seq_len, len(data) - 1):  # never changed silently
        raise TinyMixtralError(f"--seq-len must be between 1 and {min(model.cfg.max_seq_len, len(data) - 1)} "
                               f"(the model's max_seq_len {model.cfg.max_seq_len}, the split's {len(data):,} tokens "
                               f"less one), got {seq_len}")
    loss = evaluate(model, data, batch_size, seq_len, device, max_batches)
    n_windows = len(window_starts(len(data), batch_size, seq_len, max_batches))
    return {"model": str(Path(model_dir).resolve()), "split": split, "loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": bits_per_byte(loss, meta, split),
            "tokens": n_windows * seq_len, "seq_len": seq_len}
