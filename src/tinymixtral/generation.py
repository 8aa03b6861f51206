"""Text generation with a KV cache: pure sampling functions, prefill, a decode loop, the `generate` command.

The prompt is prefilled in chunks (at most the sliding window each, so memory stays bounded); then
each step feeds one token per row and reads everything else from the cache. A batch of prompts of
different lengths is left-padded; each row keeps its own positions, so its tokens are exactly those
it would get alone.

With compile=True the decode step runs through torch.compile on a static view of the cache
(`cache.StaticStep`): same shapes every step, so one graph serves the whole generation, and the
~550 small PyTorch ops of an eager step become a few fused kernels. It pays on long generations:
the first step compiles for a minute or more on a CPU, then ~10 s in later processes, which read
inductor's on-disk caches. compile="auto" (the commands' default) compiles from AUTO_COMPILE_TOKENS
new tokens, and decodes eagerly, with one warning line, if compiling fails. On the CPU the step is compiled
ahead of time (`_compile_step`): its guards are checked once per generation, not at every step.

On a CPU with tinymixtral's kernels, an fp32 model (int8 / int4 weights included) and up to 16 rows, the decode
step is one C++ op instead (`model/fused.py`), whatever `compile` says: faster than the compiled step, with
nothing to compile. compile then matters elsewhere only (a GPU, bf16, more rows).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import torch

from .cache import KVCache, StaticStep
from .errors import TinyMixtralError, first_line
from .model import fast, fused, gemv
from .model.quant import compile_pays

# compile="auto" compiles the decode step from this many new tokens. Compiling costs ~11-16 s in a process that
# finds it in inductor's on-disk cache (a minute or more the first time) and saves 12-36 ms per token on
# demo / tiny-mixtral shapes (busy 2-core CPU, 1 thread): it pays from ~450-1000 tokens (README, Generation).
AUTO_COMPILE_TOKENS = 1024


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return gemv.argmax(logits_BV) if gemv.argmax_applies(logits_BV) else logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits_BV = logits_BV.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits_BV.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): divide positive, multiply negative logits of seen tokens."""
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def left_pad(prompts: list[list[int]], pad_id: int = 0, device=None):
    """Ragged prompts -> ids [B, S] padded on the left, and positions [B, S] (padding < 0)."""
    S = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (S - len(p)) + list(p) for p in prompts], device=device)
    pos = torch.arange(S, device=device)[None, :] - torch.tensor([S - len(p) for p in prompts], device=device)[:, None]
    return ids, pos


@torch.no_grad()
def stream(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, eos_id: int | None = None,
           repetition_penalty: float | None = None, prefill_chunk: int | None = None,
           compile: bool | str = False, cache: KVCache | None = None,
           generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token id of every row, [B], one step at a time.

    prompts: ids [B, S] or a list of id lists (ragged). Rows that produced eos_id keep yielding it;
    the loop ends when all have, or after max_new_tokens. compile: decode through torch.compile (True),
    eagerly (False), or "auto": compiled when it pays (auto_compile), eager with a warning if compiling fails.
    cache: continue what it holds (a conversation, one row): the prompt's positions follow the cached
    ones, and the reply stops where a cache without a rolling window is full. The last token yielded
    is not in the cache (nothing was computed after it): the next prompt starts with it. generator:
    the sampling RNG to draw from (default: a new one seeded with `seed`).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    cfg, device = model.cfg, model.embed.weight.device
    rows = prompts.tolist() if torch.is_tensor(prompts) else [list(p) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise TinyMixtralError("every prompt needs at least one token")
    ids, pos = left_pad(rows, device=device)
    B, S = ids.shape
    if cache is not None:
        pos = pos + cache.t  # continues the cached sequence (time steps are positions for unpadded rows)
        if cache.window is None or cache.slots < cache.window:  # a static cache: it must not wrap
            room = cache.slots - cache.t - S
            if room < 0:
                raise TinyMixtralError(f"the context is full: {cache.t} tokens held + {S} new exceed its "
                                       f"{cache.slots}; start over (a new cache)")
            max_new_tokens = min(max_new_tokens, room + 1)  # the last token sampled is never fed
    elif cfg.sliding_window is None and S + max_new_tokens > cfg.max_seq_len:
        raise TinyMixtralError(f"prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                               f"{cfg.max_seq_len} positions")
    if compile not in (True, False, "auto"):
        raise TinyMixtralError(f"compile must be True, False or 'auto', got {compile!r}")
    fallback = compile == "auto"
    # on a CPU with our kernels the decode step is one C++ op (fused.py), faster than a compiled step: nothing compiles
    plan = fused.plan(model, B)
    if plan is not None:
        compile = False
    elif fallback:
        compile = auto_compile(model, max_new_tokens)
    model.eval()
    if cache is None:
        # compiled: the cache size is part of the graph's shape, so round it up and let most lengths share a graph
        cache = KVCache.for_model(model, B, -(-(S + max_new_tokens) // 256) * 256 if compile else S + max_new_tokens)
    gen = generator or (torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None)
    seen = None
    if repetition_penalty and repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
    chunk = min(prefill_chunk or cfg.sliding_window or 512, cache.slots)
    prompt_plan = plan if S == 1 else fused.plan(model, B * S) if plan and fused_prompt_fits(cache, B, S) else None
    if prompt_plan is not None:  # a short prompt: the fused op too, its tokens as rows
        logits = fused_step(prompt_plan, cache, ids, pos)
    for i in range(0, S if prompt_plan is None else 0, chunk):  # chunked prefill: memory bounded by the chunk
        logits = model(ids[:, i:i + chunk], cache=cache, positions_BS=pos[:, i:i + chunk], last_only=True)
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_fn = None  # the compiled step of this generation (compiled_step), looked up at its first compiled step
    step_op = fused_stepper(plan, cache) if plan is not None else None  # the fused op's decode step
    greedy_op = plan is not None and temperature == 0  # the fused op's logits: fp32 [B, V], argmax's own kernel
    for step in range(max_new_tokens):
        logits_BV = logits if logits.dim() == 2 else logits[:, -1]
        if seen is not None:
            logits_BV = apply_repetition_penalty(logits_BV, seen, repetition_penalty)
        nxt = gemv.argmax(logits_BV) if greedy_op else sample(logits_BV, temperature, top_k, top_p, gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        yield nxt
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            return  # no forward pass for a token nobody will sample after
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        if step_op is not None:
            logits = step_op(nxt, next_pos)
        elif compile:
            try:
                step_fn = step_fn or compiled_step(model, cache, nxt[:, None], next_pos)
                logits = decode_compiled(model, cache, nxt[:, None], next_pos, step_fn)
            except CompileFailed as e:
                if not fallback:
                    raise
                print(f"warning: {e.reason}; decoding without compiling", file=sys.stderr, flush=True)
                compile = False  # the failed step wrote nothing the eager one does not write again
        if plan is None and not compile:
            logits = model(nxt[:, None], cache=cache, positions_BS=next_pos)
        next_pos = next_pos + 1


def fused_step(plan: fused.Plan, cache: KVCache, ids_BS: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
    """model(ids_BS, cache=cache, positions_BS=pos_BS, last_only=True)[:, -1] as one op (fused.op): logits [B, V].
    ids [B, S] or [B] (one token a row); plan: fused.plan for B * S rows; S > 1 (a short prompt) needs a cache that
    has never wrapped (fused_prompt_fits)."""
    return fused_stepper(plan, cache)(ids_BS, pos_BS)


def fused_stepper(plan: fused.Plan, cache: KVCache):
    """fused_step(plan, cache, ·, ·) as a function of (ids, pos), with what a generation keeps fixed looked up once:
    the op, the cache's tensors and size (nn.Module attribute lookups and torch.ops' lookup cost ~10 us a token).
    The op writes the new keys at slots t % T on; KVCache._check_room refuses a static cache that would wrap."""
    op, k, v, cache_pos, T = fused.op(), cache.k, cache.v, cache.pos, cache.slots

    def step(ids_BS: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        S = ids_BS.shape[1] if ids_BS.dim() == 2 else 1
        if cache.t + S > T:
            cache._check_room(S)
        logits = op(ids_BS.contiguous(), pos_BS.contiguous(), k, v, cache_pos, cache.t % T, plan.held)
        cache.t += S
        return logits

    return step


def fused_prompt_fits(cache: KVCache, n_rows: int, S: int) -> bool:
    """Whether a prompt of S tokens in n_rows rows can go through the fused op: few rows, and a cache that has never
    wrapped and will not (the op writes the new keys before attention reads them, as KVCache.plan does only then:
    in a rolling buffer that has wrapped, a new token would overwrite a key an earlier one of the prompt still sees)."""
    return n_rows * S <= fast.FEW_ROWS and cache.t + S <= cache.slots


def auto_compile(model, max_new_tokens: int) -> bool:
    """Whether compile="auto" compiles: a long enough generation (AUTO_COMPILE_TOKENS) on a CPU or a CUDA GPU, of
    an unquantized model or a quantized one whose compiled step calls the kernels (quant.compile_pays): on
    tiny-mixtral compiled int8 / int4 decode 1.5x eager, at the 7B shape the same speed (README)."""
    return (max_new_tokens >= AUTO_COMPILE_TOKENS and model.embed.weight.device.type in ("cpu", "cuda")
            and (model.cfg.quantization is None or compile_pays(model)))


class CompileFailed(TinyMixtralError):
    """torch.compile could not compile the decode step (no C++ compiler, an unsupported op...)."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; generate without compiling (--compile false)")
        self.reason = reason


def _decode_step(model, k, v, pos, slot_1, ids_B1, pos_B1):
    return model(ids_B1, cache=StaticStep(k, v, pos, slot_1, model.cfg.sliding_window), positions_BS=pos_B1)


class _Guarded:
    """A step compiled by plain torch.compile: Dynamo checks its guards (and recompiles) at every call."""

    def __init__(self, fn):
        self.fn = fn

    def guard_check(self, *args) -> bool:
        return True

    def __call__(self, *args):
        return self.fn(*args)


def _compile_step(device_type: str, args: tuple):
    """_decode_step compiled for `args`. On the CPU ahead of time (`aot_compile`): a function whose guards (the
    shapes, dtypes, flags and model structure it was traced for) are checked by us, once per generation, instead of
    by Dynamo at every step (0.1-0.4 ms a step), with inductor's C++ wrapper calling the graph's kernels from C++
    (0.2 ms a step less than its Python wrapper). b.json fp32, alternating rounds: 1.94 -> 1.78 ms a token. Elsewhere, or
    where this torch has no aot_compile: plain torch.compile."""
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    if device_type == "cpu":
        compiled = torch.compile(_decode_step, dynamic=False, fullgraph=True, options=options)
        try:  # an experimental API (torch 2.10+): where it is missing or differs, Dynamo's guards as before
            step = compiled.aot_compile((args, {}))
            if callable(getattr(step, "guard_check", None)) and hasattr(step, "_guard_check_enabled"):
                step._guard_check_enabled = False  # compiled_step checks them, once per generation
                return step
        except Exception:
            pass
    return _Guarded(torch.compile(_decode_step, dynamic=False, options=options))


# The compiled steps so far, per device type: one per batch size, cache size, model structure and dtype...; at most
# MAX_STEPS (Dynamo's own recompile limit is 8 per function).
_compiled_steps: dict[str, list] = {}
MAX_STEPS = 8


def compiled_step(model, cache: KVCache, ids_B1: torch.Tensor, pos_B1: torch.Tensor):
    """The compiled decode step whose guards accept these inputs, compiled now if none does. Within one generation
    nothing they guard changes, so stream() looks it up once and passes it to every decode_compiled."""
    args = (model, *cache.static_step(), ids_B1, pos_B1)
    steps = _compiled_steps.setdefault(ids_B1.device.type, [])
    try:
        for step in steps:
            if step.guard_check(*args):
                return step
        steps.append(_compile_step(ids_B1.device.type, args))
        del steps[:-MAX_STEPS]  # the oldest go first (a generation's start checks each kept one: ~0.5 ms)
    except Exception as e:  # no C++ compiler, an unsupported op...: one line, not inductor's pages
        raise _failed(e) from e
    return steps[-1]


def _failed(e: Exception) -> CompileFailed:
    return CompileFailed(f"torch.compile failed ({first_line(e)})")


def decode_compiled(model, cache: KVCache, ids_B1: torch.Tensor, pos_B1: torch.Tensor, step=None) -> torch.Tensor:
    """model(ids_B1, cache=cache, positions_BS=pos_B1) for one token per row, compiled.

    Compiles on first use and again for a new batch size or cache size (shapes are static). step: what
    compiled_step returned for an earlier step of the same generation (default: look it up now).
    """
    step = step or compiled_step(model, cache, ids_B1, pos_B1)
    try:
        logits = step(model, *cache.static_step(), ids_B1, pos_B1)
    except Exception as e:
        raise _failed(e) from e
    cache.t += 1
    return logits


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_id: int | None = None, **kw):
    """Prompt + new token ids: a tensor [B, S + new] for a tensor prompt, else a list of lists (ragged)."""
    new = [t.tolist() for t in stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id, **kw)]
    if torch.is_tensor(input_ids):
        return torch.cat([input_ids, torch.tensor(new, device=input_ids.device).T.reshape(len(input_ids), -1)], dim=1)
    out = []
    for b, prompt in enumerate(input_ids):
        row = [step[b] for step in new]
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(list(prompt) + row)
    return out


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty=None):
    if not 0 <= temperature < math.inf:  # NaN fails every comparison
        raise TinyMixtralError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature}")
    if top_k is not None and top_k < 1:
        raise TinyMixtralError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise TinyMixtralError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and not 0 < repetition_penalty < math.inf:
        raise TinyMixtralError(f"repetition_penalty must be > 0 and finite, got {repetition_penalty}")


def printable(text: str, stops: list[str] | None) -> str:
    """The part of streamed text that is safe to print: not a half-decoded UTF-8 character at the end
    (byte-level tokens can split one), nor an end that may yet become a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops or [] for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
               default=0)
    return text[:len(text) - hold]
