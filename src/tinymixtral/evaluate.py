"""`tinymixtral eval`: loss per token, perplexity and bits per byte of a model on a data split."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TinyMixtralError


@torch.no_grad()
def evaluate(model, data: np.ndarray, batch: int, seq_len: int, device, max_batches: int | None) -> float:
    """Mean next-token loss over evenly spaced, non-overlapping windows of a split (deterministic)."""
    starts = window_starts(len(data), batch, seq_len, max_batches)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        x = torch.from_numpy(np.stack([data[s:s + seq_len + 1].astype(np.int64) for s in starts[i:i + batch]]))
        x = x.to(device)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def window_starts(n_tokens: int, batch: int, seq_len: int, max_batches: int | None) -> list[int]:
    """Starts of the evaluation windows: all that fit, or max_batches * batch of them spread evenly."""
    n_fit = (n_tokens - 1) // seq_len
    if n_fit < 1:
        raise TinyMixtralError(f"split has {n_tokens} tokens, fewer than seq_len+1 ({seq_len + 1})")
    n_windows = min(n_fit, max_batches * batch) if max_batches else n_fit
    stride = n_fit // n_windows * seq_len
    return [i * stride for i in range(n_windows)]


def bits_per_byte(loss: float, meta: dict, split: str) -> float:
    """Nats per token -> bits per UTF-8 byte of the text, using the split's token/byte ratio."""
    return loss / math.log(2) * meta[f"{split}_tokens"] / meta[f"{split}_bytes"]


def eval_model(model_dir: str, data_dir: str, split: str = "val", seq_len: int | None = None,
               batch_size: int = 8, max_batches: int | None = None, device: str | None = None) -> dict:
    """{'loss', 'ppl', 'bpb', 'tokens'} of a model directory on a prepared data split."""
    from .checkpoint import load_model
    from .data import load_split

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data, meta = load_split(data_dir, split)
    model = load_model(model_dir, device=device, dtype=torch.float32)
    if meta["vocab_size"] > model.cfg.vocab_size:
        raise TinyMixtralError(f"the data's tokenizer has {meta['vocab_size']} tokens, the model only "
                               f"{model.cfg.vocab_size}: this data was not prepared for this model")
    seq_len = min(seq_len or 512, model.cfg.max_seq_len, len(data) - 1)
    loss = evaluate(model, data, batch_size, seq_len, device, max_batches)
    n_windows = len(window_starts(len(data), batch_size, seq_len, max_batches))
    return {"split": split, "loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": bits_per_byte(loss, meta, split),
            "tokens": n_windows * seq_len, "seq_len": seq_len}


def add_arguments(p):
    p.add_argument("--model", required=True, help="a model directory")
    p.add_argument("--data", required=True, help="a prepared data directory")
    p.add_argument("--split", default="val", help="val or train")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: 512 or the model's max)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    r = eval_model(args.model, args.data, args.split, args.seq_len, args.batch_size, args.max_batches)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{args.split}: loss {r['loss']:.4f} nats/token   perplexity {r['ppl']:.3f}   "
              f"{r['bpb']:.4f} bits/byte   ({r['tokens']:,} tokens, windows of {r['seq_len']})")
    return 0
