"""Text generation: pure sampling functions, a token loop, and the `generate` command.

This first version recomputes the whole (cropped) sequence at every step: simple and exact, and
fast enough for tiny models. The rolling-buffer KV cache replaces it (issue: generate fast).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import torch

from .errors import TinyMixtralError


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits_BV.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model, input_ids_BS: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] one step at a time (stops early when every row has produced EOS)."""
    check_sampling(temperature, top_k, top_p)
    model.eval()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=input_ids_BS.device).manual_seed(seed)
    ids = input_ids_BS
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        context = ids[:, -model.cfg.max_seq_len:]
        start = ids.shape[1] - context.shape[1]
        logits = model(context, start_pos=start)[:, -1]
        nxt = sample(logits, temperature, top_k, top_p, gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        yield nxt
        if eos_id is not None and bool(done.all()):
            return


def generate(model, input_ids_BS: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """Prompt plus generated token ids [B, S + new]."""
    new = list(stream(model, input_ids_BS, max_new_tokens, temperature, top_k, top_p, seed, eos_id))
    return torch.cat([input_ids_BS] + [t[:, None] for t in new], dim=1) if new else input_ids_BS


def check_sampling(temperature: float, top_k: int | None, top_p: float | None):
    if temperature < 0:
        raise TinyMixtralError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise TinyMixtralError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise TinyMixtralError(f"top_p must be in (0, 1], got {top_p}")


# ---- command line ----------------------------------------------------------------------------------
def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (HF format, with its tokenizer)")
    src.add_argument("--preset", help="a preset with RANDOM weights (to see what an untrained model does)")
    p.add_argument("--tokenizer", default=None, help="tokenizer: 'mistral' or a directory (default: the model's)")
    p.add_argument("--prompt", default="Once upon a time", help="the prompt")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def run(args) -> int:
    from .checkpoint import load_model
    from .config import ModelConfig
    from .model.transformer import Transformer
    from .tokenizer import load_tokenizer

    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise TinyMixtralError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise TinyMixtralError("the prompt is empty; give some text with --prompt")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        model = load_model(args.model, device=device)
        tok = load_tokenizer(args.tokenizer or args.model)
    else:
        cfg = ModelConfig.from_name(args.preset)
        torch.manual_seed(0 if args.seed is None else args.seed)
        model = Transformer(cfg).to(device).eval()
        tok = load_tokenizer(args.tokenizer or "mistral")
        print(f"[random weights of preset {args.preset}: expect gibberish until it is trained]", file=sys.stderr)
    if tok.vocab_size > model.cfg.vocab_size:
        raise TinyMixtralError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    ids = torch.tensor([tok.encode(args.prompt, bos=True)], device=device)
    print(args.prompt, end="", flush=True)
    new, shown, t0 = [], "", time.perf_counter()
    for nxt in stream(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                      eos_id=tok.eos_id):
        if int(nxt[0]) == tok.eos_id:
            break
        new.append(int(nxt[0]))
        text = tok.decode(ids[0].tolist()[1:] + new)[len(args.prompt):]  # decode whole: spaces come out right
        print(text[len(shown):], end="", flush=True)
        shown = text
    dt = time.perf_counter() - t0
    print()
    print(f"[{len(new)} tokens in {dt:.2f} s, {len(new) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
