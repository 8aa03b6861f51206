"""`tinymixtral chat`: an interactive multi-turn chat in Mistral's [INST] format (instruct.turn_ids: text
markers for Mixtral-8x7B's tokenizer, control tokens for a tokenizer.model.v3 or .v7), one KV cache for the whole
conversation (each turn prefills only its own new tokens), replies streamed as they come.

Type a message and Enter. `/reset` starts a new conversation, `/exit` (or end of input) leaves. Ctrl-C
during a reply stops the reply, not the chat. It reads stdin line by line, so it can be driven by a pipe.
"""

from __future__ import annotations

import signal
import sys

import torch

from ..build import pick_device
from ..cache import KVCache
from ..checkpoint import load_model
from ..errors import TinyMixtralError
from ..generation import check_sampling, printable, stream
from ..instruct import system_in_turn, turn_ids
from ..tokenizer import load_tokenizer
from . import add_compile_option, add_load_options, load_options, seed


def add_arguments(p):
    p.add_argument("--model", required=True, help="a model directory with its tokenizer")
    p.add_argument("--system", default=None, help="a system prompt, put in front of the first message (of every "
                   "message with a tokenizer.model.v3, as Mistral's v3 format has it in front of the last one)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--context", type=int, default=None,
                   help="tokens the conversation may hold (models without a sliding window; default: "
                        "min(max_seq_len, 4096)); a windowed model rolls over its window instead")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_compile_option(p)
    add_load_options(p)


class Stop:
    """SIGINT while a reply streams: finish the token in flight, then stop (the cache stays whole)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "requested", True))
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def run(args) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise TinyMixtralError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = pick_device(args.device)
    model = load_model(args.model, device=device, **load_options(args))
    tok = load_tokenizer(args.model)
    cfg = model.cfg
    context = min(cfg.max_seq_len, 4096) if args.context is None else args.context
    if not 1 <= context <= cfg.max_seq_len:
        raise TinyMixtralError(f"--context must be between 1 and the model's max_seq_len ({cfg.max_seq_len}), "
                               f"got {context}")
    cache = KVCache.for_model(model, 1, context)
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    interactive = sys.stdin.isatty()
    pending: list[int] = []  # tokens of the conversation not yet in the cache (the reply's last one, </s>)
    first = True
    print(f"[chat with {args.model}: /reset starts over, /exit leaves]", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            cache.reset()
            pending, first = [], True
            print("[new conversation]", file=sys.stderr)
            continue
        # a new message is the last one of the conversation so far
        system = args.system if system_in_turn(tok.instruct_format, 0 if first else 1, last=True) else None
        turn = turn_ids(tok, message, system, bos=first)
        try:
            reply = _reply(model, tok, cache, pending + turn, args, gen)
        except TinyMixtralError as e:  # the context is full: say so, keep the chat
            print(f"[{e}; /reset to start over]", file=sys.stderr)
            continue
        first = False
        pending = ([reply[-1]] if reply and reply[-1] != tok.eos_id else []) + [tok.eos_id]  # close the turn


def _reply(model, tok, cache, ids, args, gen) -> list[int]:
    """Stream one reply to stdout; returns its tokens (the last one not yet in the cache)."""
    reply, shown = [], ""
    with Stop() as stop:
        for step in stream(model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           eos_id=tok.eos_id, cache=cache, generator=gen, compile=args.compile):
            t = int(step[0])
            reply.append(t)
            if t == tok.eos_id:
                break
            text = printable(tok.decode(reply), None)
            print(text[len(shown):], end="", flush=True)
            shown = text
            if stop.requested:
                print(" [stopped]", end="")
                break
    text = tok.decode([t for t in reply if t != tok.eos_id])
    print(text[len(shown):], flush=True)
    return reply
