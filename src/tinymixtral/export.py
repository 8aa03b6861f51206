"""GGUF export: a model as one file that llama.cpp (and ollama, LM Studio, ...) runs token for token.

The file is what llama.cpp's own converter (`convert_hf_to_gguf.py`, its `LlamaModel`) writes for a
Mixtral or Mistral checkpoint: architecture `llama`, the same metadata keys, the same tensor names
(`blk.N.attn_q`, stacked experts `blk.N.ffn_{gate,up,down}_exps`, ...), q and k rows permuted back to
the interleaved rotary pairs llama.cpp rotates, norms and the router in f32, and no `output.weight`
for a tied head. It is written with ggml-org's own `gguf` package, one tensor at a time (memory: the
model plus one tensor), to a temporary name renamed at the end.

One difference is on purpose: llama.cpp attends causally over its whole context on this architecture
(no sliding window), so the context length written is capped at the model's window unless asked not
to; within it, both compute the same function.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import has_tokenizer, load_model, model_format
from .config import ModelConfig
from .errors import TinyMixtralError
from .native import read_params, rope_to_native
from .tokenizer import Tokenizer, load_tokenizer

TYPES = ("f32", "f16", "q8_0", "q4_0")
# The byte-level BPE's pre-tokenizer is tokenizers' ByteLevel regex, which is GPT-2's:
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ ; llama.cpp's "gpt-2" is that regex.
BPE_PRE = "gpt-2"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise TinyMixtralError("GGUF export needs the gguf package: pip install 'tinymixtral[gguf]'") from None
    return gguf


def export_gguf(model_dir: str | Path, out: str | Path, type: str = "f32", full_context: bool = False) -> dict:
    """Write the model directory `model_dir` (with its tokenizer) as a GGUF file; returns what write_gguf says."""
    check_type(type)
    _check_out(out)
    src = Path(model_dir)
    if not src.is_dir():
        raise TinyMixtralError(f"model directory not found: {src}")
    fmt = model_format(src)
    cfg = read_params(src) if fmt == "mistral" else ModelConfig.load(src / "config.json")
    _check_full_precision(cfg, src)
    tokenizer = _tokenizer_of(src)
    model = load_model(src)  # weights as stored; each is made f32/f16/quantized as it is written
    return write_gguf(model, tokenizer, out, type, full_context, name=src.resolve().name)


def _check_out(out: str | Path) -> None:
    if Path(out).is_dir():
        raise TinyMixtralError(f"{out} is a directory; the GGUF output is a file (e.g. {Path(out) / 'model.gguf'})")


def check_type(type: str):
    if type not in TYPES:
        raise TinyMixtralError(f"unsupported GGUF type {type!r}; choose one of: {', '.join(TYPES)}")


def _check_full_precision(cfg: ModelConfig, where) -> None:
    if cfg.quantization:
        raise TinyMixtralError(f"{where} is a tinymixtral-quantized model (int{cfg.quantization['bits']}); export "
                               "its full-precision source and pick --type q8_0 or q4_0 for llama.cpp's own formats")


def _tokenizer_of(src: Path) -> Tokenizer:
    if not has_tokenizer(src):
        raise TinyMixtralError(f"no tokenizer (tokenizer.model, tokenizer.model.vN or tokenizer.json) in {src}: a GGUF "
                               "file carries its tokenizer, so export a model directory saved with one")
    return load_tokenizer(src)  # a SentencePiece model's control pieces ([INST], ... in .v3) become CONTROL tokens


def context_length(cfg: ModelConfig, full_context: bool = False) -> int:
    """The context length written: max_seq_len, capped at the sliding window unless full_context."""
    if cfg.sliding_window is not None and not full_context:
        return min(cfg.max_seq_len, cfg.sliding_window)
    return cfg.max_seq_len


def write_gguf(model, tokenizer: Tokenizer, out: str | Path, type: str = "f32", full_context: bool = False,
               name: str | None = None, progress: bool | None = None) -> dict:
    """Write an in-memory model and its tokenizer as a GGUF file at `out` (via a temporary name).

    Returns {"path", "type", "context_length", "capped" (the window cut the context), "tensors", "bytes"}.
    """
    check_type(type)
    _check_out(out)
    gguf = _gguf()
    cfg = model.cfg
    _check_full_precision(cfg, "the model")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TinyMixtralError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                               f"{cfg.vocab_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    n_ctx = context_length(cfg, full_context)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _metadata(writer, gguf, cfg, type, n_ctx, name or "tinymixtral")
        _tokenizer_metadata(writer, gguf, tokenizer, cfg.vocab_size)
        plan = []  # (name, tensor, qtype)
        for tname, t in _tensors(model):
            qtype = _qtype(gguf, tname, t, type)
            plan.append((tname, qtype))
            shape, dtype, nbytes = _info(gguf, t.shape, qtype)
            writer.add_tensor_info(tname, shape, dtype, nbytes, raw_dtype=qtype if dtype == np.uint8 else None)
        writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))  # e.g. "8x30M", as the converter
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = 0
        bar = tqdm(_tensors(model), total=len(plan), desc=f"writing {out.name}", unit="tensor",
                   disable=None if progress is None else not progress, leave=False)
        for (tname, t), (planned, qtype) in zip(bar, plan):
            assert tname == planned, f"tensor order changed: {tname} != {planned}"
            data = _encode(gguf, t, qtype)
            writer.write_tensor_data(data)
            total += data.nbytes
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    capped = n_ctx < cfg.max_seq_len
    return {"path": str(out), "type": type, "context_length": n_ctx, "capped": capped, "tensors": len(plan),
            "bytes": out.stat().st_size}


# ---- tensors ----------------------------------------------------------------------------------------
def _tensors(model):
    """(GGUF name, tensor) in llama.cpp's names and layouts, made one at a time from our state dict."""
    cfg = model.cfg
    sd = model.state_dict()
    H, G, C = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    yield "token_embd.weight", sd["embed.weight"]
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", sd[p + "attn_norm.weight"]
        q, k, v = sd[p + "attn.wqkv.weight"].split([H * C, G * C, G * C])
        yield b + "attn_q.weight", rope_to_native(q, H)  # rotate-half rows -> interleaved pairs
        yield b + "attn_k.weight", rope_to_native(k, G)
        yield b + "attn_v.weight", v
        yield b + "attn_output.weight", sd[p + "attn.wo.weight"]
        yield b + "ffn_norm.weight", sd[p + "ffn_norm.weight"]
        if cfg.is_moe:  # router noise (noisy gating) is training-only: not exported
            yield b + "ffn_gate_inp.weight", sd[p + "ffn.router.weight"]
            gate, up = sd[p + "ffn.experts.w13"].chunk(2, dim=1)  # [E, 2F, D] -> w1, w3 stacked [E, F, D]
            yield b + "ffn_gate_exps.weight", gate
            yield b + "ffn_up_exps.weight", up
            yield b + "ffn_down_exps.weight", sd[p + "ffn.experts.w2"]  # [E, D, F]
        else:
            gate, up = sd[p + "ffn.w13.weight"].chunk(2, dim=0)
            yield b + "ffn_gate.weight", gate
            yield b + "ffn_up.weight", up
            yield b + "ffn_down.weight", sd[p + "ffn.w2.weight"]
    yield "output_norm.weight", sd["norm.weight"]
    if not cfg.tie_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        yield "output.weight", sd["lm_head.weight"]


def _qtype(gguf, name: str, t: torch.Tensor, type: str):
    """The converter's rule: 1-D tensors, norms and the router f32; the rest the asked type (f16 if rows don't fit
    the quantization block)."""
    Q = gguf.GGMLQuantizationType
    if t.dim() <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or type == "f32":
        return Q.F32
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    if qtype in (Q.Q8_0, Q.Q4_0) and t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return Q.F16
    return qtype


def _info(gguf, shape, qtype):
    """(shape to declare, numpy dtype, bytes) of a tensor written as qtype."""
    Q = gguf.GGMLQuantizationType
    shape = tuple(shape)
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), int(np.prod(shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _encode(gguf, t: torch.Tensor, qtype) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


# ---- metadata ---------------------------------------------------------------------------------------
def _metadata(w, gguf, cfg: ModelConfig, type: str, n_ctx: int, name: str):
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(n_ctx)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.is_moe:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.top_k)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(ftype)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer_metadata(w, gguf, tok: Tokenizer, vocab_size: int):
    """Tokens, their types (and scores or merges), special ids: as the converter's _set_vocab_sentencepiece /
    _set_vocab_gpt2 write them. Ids the tokenizer lacks up to the model's vocabulary are [PADi], unused."""
    T = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    types = [T.UNUSED] * vocab_size
    if tok.kind == "mistral":
        sp = tok.backend
        scores = [-10000.0] * vocab_size
        for i in range(sp.vocab_size()):
            tokens[i], scores[i] = sp.id_to_piece(i).encode(), sp.get_score(i)
            types[i] = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                        T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        unk = sp.unk_id()
    else:
        spec = json.loads(tok.backend.to_str())
        _check_bpe(spec)
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
        for piece, i in vocab.items():
            tokens[i] = piece.encode()
            types[i] = T.CONTROL if i in special else T.NORMAL
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(BPE_PRE)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        unk = tok.backend.token_to_id("<unk>")
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    if unk is not None and unk >= 0:
        w.add_unk_token_id(unk)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)  # both of ours put BOS in front (tokenizer_config.json: add_bos_token)
    w.add_add_eos_token(False)
    w.add_add_sep_token(False)


def _check_bpe(spec: dict):
    """Refuse a tokenizer.json that llama.cpp's gpt-2 BPE would not reproduce id for id."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')!r} (not BPE)")
    if spec.get("normalizer"):
        problems.append(f"a {spec['normalizer'].get('type')} normalizer")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append(f"pre-tokenizer {pre or None} (llama.cpp's gpt-2 is ByteLevel, regex on, no prefix space)")
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        problems.append("BPE options llama.cpp's byte-level BPE lacks (byte fallback, dropout, affixes, ignore_merges)")
    if problems:
        raise TinyMixtralError("this tokenizer.json cannot be reproduced by llama.cpp: " + "; ".join(problems))
