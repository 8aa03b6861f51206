"""Loss per token, perplexity and bits per byte of a model on a data split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .build import pick_device
from .chats import eval_windows
from .checkpoint import load_model
from .data import IGNORE, check_tokenizer, load_mask, load_split, window_starts, windows
from .errors import TinyMixtralError


@torch.no_grad()
def evaluate(model, data: np.ndarray, batch: int, seq_len: int, device, max_batches: int | None,
             mask: np.ndarray | None = None, bos_id: int = 1, rank: int = 0, world: int = 1) -> float:
    """Mean next-token loss over evenly spaced, non-overlapping windows of a split (deterministic).

    With a loss mask (conversations) only the trained targets count, over windows cut at conversation
    starts (chats.eval_windows: all of them, or max_batches * batch spread over the split).
    The windows are those of one process reading batches of batch * world; with world > 1 (torchrun) each
    process reads every world-th of them and the sums are all-reduced, so every process returns the loss of
    the whole set. All processes run the same number of forward passes (a process out of windows runs one
    it does not count), because an FSDP forward is a collective."""
    starts, cols = _windows(data, batch * world, seq_len, max_batches, mask, bos_id)
    mine = list(range(rank, len(starts), world))
    n_steps = math.ceil(math.ceil(len(starts) / world) / batch)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0  # loss sum, counted targets
    for i in range(n_steps):
        chunk = mine[i * batch:(i + 1) * batch]
        rows = chunk or [0]
        x, y = windows(data, [starts[j] for j in rows], seq_len, device, mask,
                       [cols[j] for j in rows] if cols else None)
        logits = model(x)
        if chunk:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            total, count = total + loss.item(), count + int((y != IGNORE).sum())
    if world > 1:  # on the model's device: NCCL reduces CUDA tensors only
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = sums.tolist()
    model.train(was_training)
    if count == 0:
        raise TinyMixtralError("the evaluated windows hold no trained (assistant) token")
    return total / count


def _windows(data, batch: int, seq_len: int, max_batches: int | None, mask, bos_id: int):
    """The starts of evaluate's windows, and for conversations each one's counted columns (lo, hi)."""
    if mask is None:
        return window_starts(len(data), batch, seq_len, max_batches), None
    wins = eval_windows(data, bos_id, seq_len)
    if max_batches and max_batches * batch < len(wins):
        n = max_batches * batch
        wins = [wins[round(i * (len(wins) - 1) / max(n - 1, 1))] for i in range(n)]
    return [w[0] for w in wins], [w[1:] for w in wins]


def evaluated_tokens(data, batch: int, seq_len: int, max_batches: int | None, mask=None, bos_id: int = 1) -> int:
    """How many targets evaluate() counts with the same arguments."""
    starts, cols = _windows(data, batch, seq_len, max_batches, mask, bos_id)
    if cols is None:
        return len(starts) * seq_len
    seen = np.concatenate([[0], np.cumsum(np.asarray(mask), dtype=np.int64)])
    return int(sum(seen[s + 1 + hi] - seen[s + 1 + lo] for s, (lo, hi) in zip(starts, cols)))


def bits_per_byte(loss: float, meta: dict, split: str) -> float:
    """Nats per token -> bits per UTF-8 byte of the text, using the split's token/byte ratio (of the trained
    tokens and the replies' text, for conversations)."""
    if meta.get(f"{split}_loss_tokens"):
        return loss / math.log(2) * meta[f"{split}_loss_tokens"] / max(meta[f"{split}_loss_bytes"], 1)
    return loss / math.log(2) * meta[f"{split}_tokens"] / meta[f"{split}_bytes"]


def eval_model(model_dir: str, data_dir: str, split: str = "val", seq_len: int | None = None,
               batch_size: int = 8, max_batches: int | None = None, device: str | None = None,
               dtype: torch.dtype | None = torch.float32, bits: int | None = None,
               group_size: int | None = None) -> dict:
    """{'loss', 'ppl', 'bpb', 'tokens', 'model', ...} of a model directory on a prepared data split.

    'model' is the directory actually read: a run's `best` or `latest` link resolved to its checkpoint."""
    device = pick_device(device)
    data, meta = load_split(data_dir, split)
    mask = load_mask(data_dir, split, meta)
    check_tokenizer(data_dir, meta, model_dir)
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
    loss = evaluate(model, data, batch_size, seq_len, device, max_batches, mask, meta.get("bos_id", 1))
    n_tokens = evaluated_tokens(data, batch_size, seq_len, max_batches, mask, meta.get("bos_id", 1))
    return {"model": str(Path(model_dir).resolve()), "split": split, "loss": loss, "ppl": math.exp(min(loss, 50)),
            "bpb": bits_per_byte(loss, meta, split), "tokens": n_tokens, "seq_len": seq_len,
            "assistant_only": mask is not None}
