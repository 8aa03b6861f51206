"""Chat fine-tuning data: conversations -> token ids plus a loss mask, and the windows that read them.

A conversation is a .jsonl line `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`:
an optional system message first, then user and assistant turns alternating, the last one a reply. It is
tokenized turn by turn by instruct.turn_ids and reply_ids (Mistral's [INST] template in the tokenizer's
instruct format, the one `generate --chat` and `chat` use): <s>[INST] ... [/INST] reply</s>[INST] ... [/INST] reply</s>.
The mask is 1 on the tokens training learns to predict: each reply's tokens and its </s>; 0 on <s>, the
prompts and the system text. Plain-text documents in the same data are trained on every token (mask 1).
"""

from __future__ import annotations

import numpy as np

from .errors import TinyMixtralError
from .instruct import chat_segments, chat_turns, reply_ids, turn_ids

ROLES = ("system", "user", "assistant")


def parse_conversation(row, where: str) -> list[dict]:
    """The messages of one .jsonl row, checked; `where` ('file:line') starts the error message."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise TinyMixtralError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TinyMixtralError(f"{where}: message {i} must be an object with a role ({', '.join(ROLES)}) "
                                   "and a content string")
    first = 1 if msgs[0]["role"] == "system" else 0
    turns = msgs[first:]
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise TinyMixtralError(f"{where}: message {first + i} is {m['role']!r} where {want!r} was expected "
                                   "(an optional system message first, then user and assistant alternating)")
    if not turns or turns[-1]["role"] != "assistant":
        raise TinyMixtralError(f"{where}: the conversation must end with an assistant reply (nothing to train)")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def encode_conversation(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask (1 = a reply token or a reply's </s>)."""
    ids, mask = [], []
    for role, content, system in chat_turns(messages, tok.instruct_format):
        part = turn_ids(tok, content, system, bos=not ids) if role == "user" else reply_ids(tok, content)
        ids += part
        mask += [int(role != "user")] * len(part)
    return ids, mask


def chat_text(messages: list[dict]) -> str:
    """The rendered conversation as one text (what a BPE is trained on)."""
    return " ".join(text for text, _ in chat_segments(messages))


def loss_bytes(doc) -> int:
    """UTF-8 bytes of the text whose tokens are trained: a reply's content, or a whole text document."""
    if isinstance(doc, str):
        return len(doc.encode("utf-8"))
    return sum(len(m["content"].encode("utf-8")) for m in doc if m["role"] == "assistant")


def train_starts(data, mask, bos_id: int, eos_id: int, seq_len: int) -> np.ndarray:
    """Where training windows start: at every conversation's <s>, and inside a conversation longer than a
    window also at each later turn (after a reply's </s>); only windows that hold a trained token."""
    data = np.asarray(data)
    n = len(data)
    bos = np.flatnonzero(data == bos_id)
    turns = np.flatnonzero(data[:-1] == eos_id) + 1
    turns = turns[data[turns] != bos_id]
    too_long = np.append(bos[1:], n) - bos > seq_len + 1
    conv = np.searchsorted(bos, turns, side="right") - 1
    turns = turns[(conv >= 0) & too_long[conv.clip(0)]] if len(bos) else turns
    starts = np.union1d(bos, turns)
    starts = starts[starts + seq_len + 1 <= n]
    seen = np.concatenate([[0], np.cumsum(np.asarray(mask), dtype=np.int64)])
    starts = starts[seen[starts + seq_len + 1] - seen[starts + 1] > 0]
    if not len(starts):
        raise TinyMixtralError(f"no window of --seq-len {seq_len} tokens starting at a conversation holds a "
                               "reply token; lower --seq-len or add data")
    return starts


def eval_windows(data, bos_id: int, seq_len: int) -> list[tuple[int, int, int]]:
    """Evaluation windows that read every target once, each cut at a conversation start where one falls
    inside it: (start, lo, hi), the window data[start : start + seq_len + 1] counting target columns lo..hi-1."""
    data = np.asarray(data)
    n = len(data)
    if n < seq_len + 1:
        raise TinyMixtralError(f"split has {n} tokens, fewer than seq_len+1 ({seq_len + 1})")
    bos = np.flatnonzero(data == bos_id)
    out, done, s = [], 0, 0  # targets at positions <= done are counted
    while done < n - 1:
        s = min(s, n - 1 - seq_len)  # the last window overlaps its neighbour and counts only new targets
        last = min(s + seq_len, n - 1)  # its last target position
        inside = bos[np.searchsorted(bos, done, side="right"):np.searchsorted(bos, last, side="right")]
        end = int(inside[-1]) if len(inside) and last < n - 1 else last
        out.append((s, done - s, end - s))  # target position p is column p - s - 1
        done = s = end
    return out
