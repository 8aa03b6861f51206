"""`tinymixtral generate`: text from a prompt, streamed, with sampling options."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..build import build_model, pick_device
from ..checkpoint import load_model
from . import add_compile_option, add_load_options, load_options, seed
from ..config import ModelConfig
from ..errors import TinyMixtralError
from ..generation import check_sampling, printable, stream
from ..instruct import chat_template, turn_ids
from ..tokenizer import load_tokenizer


def add_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (HF format, with its tokenizer)")
    src.add_argument("--preset", help="a preset with RANDOM weights (to see what an untrained model does)")
    p.add_argument("--tokenizer", default=None, help="tokenizer: 'mistral' or a directory (default: the model's)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="the prompt (default: 'Once upon a time')")
    prompt.add_argument("--prompt-file", default=None, help="a file with one prompt per line: a batch")
    p.add_argument("--chat", action="store_true", help="wrap prompts in Mistral's [INST] ... [/INST] template")
    p.add_argument("--system", default=None, help="a system prompt for --chat")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=None, help="stop a row at this string (repeatable)")
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_compile_option(p)
    add_load_options(p)


def run(args) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    if args.max_new_tokens < 1:
        raise TinyMixtralError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise TinyMixtralError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.prompt_file:
        if not Path(args.prompt_file).is_file():
            raise TinyMixtralError(f"prompt file not found: {args.prompt_file}")
        prompts = [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise TinyMixtralError(f"{args.prompt_file} holds no prompts")
    else:
        prompts = ["Once upon a time" if args.prompt is None else args.prompt]
    if any(not p.strip() for p in prompts):
        raise TinyMixtralError("the prompt is empty; give some text with --prompt")
    device = pick_device(args.device)
    if args.model:
        model = load_model(args.model, device=device, **load_options(args))
        tok = load_tokenizer(args.tokenizer or args.model)
    else:
        cfg = ModelConfig.from_name(args.preset)
        torch.manual_seed(0 if args.seed is None else args.seed)
        model = build_model(cfg, device=device).eval()
        tok = load_tokenizer(args.tokenizer or "mistral")
        print(f"[random weights of preset {args.preset}: expect gibberish until it is trained]", file=sys.stderr)
    if tok.vocab_size > model.cfg.vocab_size:
        raise TinyMixtralError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    texts = [chat_template(p, args.system, tok.instruct_format) if args.chat else p
             for p in prompts for _ in range(args.num_samples)]
    rows = [turn_ids(tok, p, args.system, bos=True) if args.chat else tok.encode(p, bos=True)
            for p in prompts for _ in range(args.num_samples)]
    echoed = [tok.decode(r) for r in rows]  # new text is what the decoded sequence adds after this
    new = [[] for _ in rows]
    live = [True] * len(rows)
    streaming = len(rows) == 1
    if streaming:
        print(texts[0], end="", flush=True)
    shown, t0, n_tokens = "", time.perf_counter(), 0
    for step in stream(model, rows, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                       tok.eos_id, args.repetition_penalty, compile=args.compile):
        for b, t in enumerate(step.tolist()):
            if live[b] and t != tok.eos_id:
                new[b].append(t)
                n_tokens += 1
            live[b] = live[b] and t != tok.eos_id
        outs = [tok.decode(rows[b] + new[b])[len(echoed[b]):] for b in range(len(rows))] if args.stop or streaming \
            else None
        if args.stop:
            for b, text in enumerate(outs):
                if live[b] and any(s in text for s in args.stop):
                    live[b] = False
        if streaming:
            text = printable(_cut(outs[0], args.stop), args.stop if live[0] else None)
            print(text[len(shown):], end="", flush=True)
            shown = text
        if not any(live):
            break
    dt = time.perf_counter() - t0
    if streaming:
        final = _cut(tok.decode(rows[0] + new[0])[len(echoed[0]):], args.stop)
        print(final[len(shown):])  # whatever was held back
    else:
        for b in range(len(rows)):
            print(f"--- {b}: " + texts[b] + _cut(tok.decode(rows[b] + new[b])[len(echoed[b]):], args.stop))
    print(f"[{n_tokens} tokens in {dt:.2f} s, {n_tokens / max(dt, 1e-9):.1f} tok/s, batch {len(rows)}]",
          file=sys.stderr)
    return 0


def _cut(text: str, stops: list[str] | None) -> str:
    """Text up to (not including) the first stop string."""
    for s in stops or []:
        if s in text:
            text = text[: text.index(s)]
    return text
