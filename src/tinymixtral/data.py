"""A prepared data directory (prepare.py writes it): its splits and loss masks, the checks that it fits a
model and a tokenizer, and the windows training and evaluation read.

Training reads random windows from the memmaps (nanoGPT's "poor man's data loader"); evaluation reads
evenly spread ones. Both come from `windows`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .checkpoint import has_tokenizer
from .errors import TinyMixtralError
# Reading sources and `prepare` live in prepare.py; these names stay importable from here
from .prepare import (DOC_SEPARATOR, TEXT_SUFFIXES, prepare, read_file, read_source, split_docs,  # noqa: F401
                      write_tokens)
from .tokenizer import load_tokenizer


def load_split(data_dir: str | Path, split: str) -> tuple[np.memmap, dict]:
    """The token memmap of a split and the data directory's meta.json."""
    data_dir = Path(data_dir)
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        raise TinyMixtralError(f"{data_dir} is not a prepared data directory (no meta.json); run `tinymixtral prepare`")
    meta = json.loads(meta_file.read_text())
    file = data_dir / f"{split}.bin"
    if not file.is_file():
        raise TinyMixtralError(f"no {split} split in {data_dir} ({file.name} missing)")
    return np.memmap(file, dtype=np.dtype(meta["dtype"]), mode="r"), meta


def load_mask(data_dir: str | Path, split: str, meta: dict) -> np.memmap | None:
    """The loss mask of a split of conversations (1 = trained token), or None for plain text."""
    if not meta.get("loss_mask"):
        return None
    file = Path(data_dir) / f"{split}.mask.bin"
    if not file.is_file():
        raise TinyMixtralError(f"no {file.name} in {data_dir}, but its meta.json says it holds a loss mask")
    return np.memmap(file, dtype=np.uint8, mode="r")


def data_tokenizer_id(data_dir: str | Path, meta: dict) -> str | None:
    """The identity of the tokenizer data were prepared with: meta.json's "tokenizer_id", or for data
    prepared before it was recorded, that of the tokenizer/ files saved beside them (None: neither)."""
    if meta.get("tokenizer_id"):
        return meta["tokenizer_id"]
    try:
        return load_tokenizer(Path(data_dir) / "tokenizer").identity()
    except TinyMixtralError:
        return None


def check_tokenizer(data_dir: str | Path, meta: dict, model_dir: str | Path) -> None:
    """Refuse data prepared with another tokenizer than the model directory's (one line). A model without
    tokenizer files, or old data without a recorded or saved tokenizer, cannot be checked and is let through."""
    ours = data_tokenizer_id(data_dir, meta)
    if ours is None or not has_tokenizer(model_dir):
        return
    try:
        theirs = load_tokenizer(model_dir).identity()
    except TinyMixtralError:
        return  # e.g. only a tokenizer_config.json: nothing to compare
    if ours != theirs:
        raise TinyMixtralError(f"{data_dir} was prepared with another tokenizer than {model_dir}'s ({ours} vs "
                               f"{theirs}); prepare the data with --tokenizer {model_dir}")


def check_training_data(meta: dict, train_data, val_data, seq_len: int, mcfg) -> None:
    """Refuse, before any training, data that does not fit the model or the window length."""
    if meta["vocab_size"] > mcfg.vocab_size:
        raise TinyMixtralError(f"the data's tokenizer has {meta['vocab_size']} tokens but the model's vocab_size is "
                               f"{mcfg.vocab_size}; set --vocab-size {meta['vocab_size']} or more")
    if seq_len > mcfg.max_seq_len:
        raise TinyMixtralError(f"--seq-len {seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if len(train_data) <= seq_len + 1:
        raise TinyMixtralError(f"the train split has only {len(train_data)} tokens; need more than seq_len+1")
    if len(val_data) < seq_len + 1:  # else the first evaluation fails after the training it cost
        raise TinyMixtralError(f"the val split has only {len(val_data)} tokens; need at least seq_len+1 "
                               f"({seq_len + 1}): lower --seq-len or prepare with a larger --val-fraction")


# ---- windows: what training and evaluation read -------------------------------------------------------
IGNORE = -100  # a target cross_entropy skips (its default ignore_index): not trained, not counted


def windows(data: np.ndarray, starts: list[int], seq_len: int, device="cpu", mask: np.ndarray | None = None,
            cols: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [len(starts), seq_len] of the windows data[s : s + seq_len + 1].

    Targets whose mask is 0, or (with cols) whose column is outside the window's [lo, hi), are IGNORE."""
    x = torch.from_numpy(np.stack([data[s:s + seq_len + 1].astype(np.int64) for s in starts]))
    y = x[:, 1:]
    if mask is not None:
        keep = torch.from_numpy(np.stack([mask[s + 1:s + seq_len + 1] for s in starts])) > 0
        if cols is not None:
            j = torch.arange(seq_len)
            keep &= torch.stack([(j >= lo) & (j < hi) for lo, hi in cols])
        y = y.masked_fill(~keep, IGNORE)
    return x[:, :-1].to(device, non_blocking=True), y.to(device, non_blocking=True)


def get_batch(data: np.ndarray, batch: int, seq_len: int, gen: torch.Generator, device, rank=0, world=1,
              mask: np.ndarray | None = None, starts: np.ndarray | None = None):
    """Random windows: every process draws the same global batch and keeps its own slice. With starts
    (conversations: chats.train_starts) the windows start there, and mask hides the untrained targets."""
    n = len(data) - seq_len - 1 if starts is None else len(starts)
    ix = torch.randint(n, (batch * world,), generator=gen)[rank * batch:(rank + 1) * batch].tolist()
    return windows(data, ix if starts is None else [int(starts[i]) for i in ix], seq_len, device, mask)


def window_starts(n_tokens: int, batch: int, seq_len: int, max_batches: int | None) -> list[int]:
    """Starts of non-overlapping evaluation windows: all that fit, or max_batches * batch of them spread
    from the start of the split to its end (the first window starts at 0, the last is the last that fits)."""
    n_fit = (n_tokens - 1) // seq_len
    if n_fit < 1:
        raise TinyMixtralError(f"split has {n_tokens} tokens, fewer than seq_len+1 ({seq_len + 1})")
    n_windows = min(n_fit, max_batches * batch) if max_batches else n_fit
    if n_windows == 1:
        return [0]
    # n_windows <= n_fit, so consecutive windows are at least one window apart: no overlap
    return [round(i * (n_fit - 1) / (n_windows - 1)) * seq_len for i in range(n_windows)]
