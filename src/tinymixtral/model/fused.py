"""A decode step as one C++ op (`csrc/decode_step.cpp`), llama.cpp's way: the whole step, every layer, in one call
that runs the products, the attention and the router through the same kernels as the modules do, and the small
ops between them as plain loops. The module path is ~10 ops a layer, and even compiled each is a boxed call into
the dispatcher plus inductor's own kernels: 0.1-0.15 ms of a 0.4 ms int4 step on b.json here, more than llama.cpp
spends on its whole step besides the products.

`plan(model, batch)` reads the model once (per generation) into the op's operands: the same tensors the modules
multiply by (quantized modules: their kernel operands), and for each product the kernel the module would pick for
that many rows. It returns None where the op does not apply, and the caller keeps the module path: not a CPU, no
AVX2 kernels, not fp32 activations (a bf16 model, a bf16 compute dtype), more than FEW_ROWS rows, a product the
kernels do not take, or modules of other classes than these. `op()` is the op's entry (generation.fused_stepper
calls it on a KVCache's tensors).
"""

from __future__ import annotations

import torch

from . import cpu_kernels, gemv
from .fast import FEW_ROWS, Linear
from .moe import Experts, FeedForward, MoE, Router
from .quant import QuantExperts, QuantLinear, _Quantized
from .transformer import TiedHead

F32, I8Q8, I8, I4Q8, I4 = range(5)  # decode_step.cpp's product kinds
ENABLED = True  # False: generation keeps the module path (tests compare the two)


class Plan:
    """The op's operands for one model and batch size: weights [tensors], meta [ints], inv_freq, eps; held in C++
    (`DecodePlan`) too, so that a step passes one object, not ~65 tensors (~8 us a step)."""

    def __init__(self, weights, meta, inv_freq, eps):
        self.weights, self.meta, self.inv_freq, self.eps = weights, meta, inv_freq, eps
        self.held = torch.classes.tinymixtral_gemv.DecodePlan(weights, meta, inv_freq, eps)


def _product(module, name: str, rows: int, experts: bool, out: list, meta: list) -> bool:
    """Append the operands of `module`'s weight `name` for a product of `rows` rows; False if the op cannot run it."""
    if isinstance(module, _Quantized):
        dtype = module._dtype(torch.empty(0))  # the compute dtype for fp32 activations
        ops = module._kernel_ops(name, dtype, torch.device("cpu")) if dtype == torch.float32 else None
        if ops is None or not cpu_kernels.calls_ours(ops, rows, experts):
            return False
        w, s, z = ops
        q8 = cpu_kernels.q8_applies(rows, w.shape[-1], module.group_size)
        if z is None:
            meta += [I8Q8 if q8 else I8, 0]
            out += [w, s]
        else:
            meta += [I4Q8 if q8 else I4, module.group_size]
            out += [w, s, z]
        return True
    w = getattr(module, name)
    if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        return False
    meta += [F32, 0]
    out.append(w.detach())
    return True


def _plain(module) -> bool:
    return type(module) in (Linear, QuantLinear, TiedHead)


def plan(model, batch: int) -> Plan | None:
    """The op's operands for `model` decoding `batch` rows, or None where it does not apply (the module path)."""
    cfg, emb = model.cfg, model.embed.weight
    if (not ENABLED or batch > FEW_ROWS or emb.device.type != "cpu" or emb.dtype != torch.float32
            or not gemv.ready() or not _plain(model.lm_head)):
        return None
    weights, meta = [emb.detach(), model.norm.weight.detach()], [
        cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts if cfg.is_moe else 0,
        cfg.top_k if cfg.is_moe else 0, cfg.sliding_window or 0]
    if not _product(model.lm_head, "weight", batch, False, weights, meta):
        return None
    for layer in model.layers:
        attn, ffn = layer.attn, layer.ffn
        if not (_plain(attn.wqkv) and _plain(attn.wo)):
            return None
        weights.append(layer.attn_norm.weight.detach())
        if not (_product(attn.wqkv, "weight", batch, False, weights, meta)
                and _product(attn.wo, "weight", batch, False, weights, meta)):
            return None
        weights.append(layer.ffn_norm.weight.detach())
        if type(ffn) is MoE and type(ffn.router) is Router and type(ffn.experts) in (Experts, QuantExperts):
            ex, rows = ffn.experts, batch * cfg.top_k
            if ffn.router.weight.dtype != torch.float32:
                return None
            weights.append(ffn.router.weight.detach())
            if not (_product(ex, "w13", rows, True, weights, meta) and _product(ex, "w2", rows, True, weights, meta)):
                return None
        elif type(ffn) is FeedForward and _plain(ffn.w13) and _plain(ffn.w2):
            if not (_product(ffn.w13, "weight", batch, False, weights, meta)
                    and _product(ffn.w2, "weight", batch, False, weights, meta)):
                return None
        else:
            return None
    norms = [model.norm, *(n for layer in model.layers for n in (layer.attn_norm, layer.ffn_norm))]
    if any(n.weight.dtype != torch.float32 or n.eps != cfg.norm_eps for n in norms):
        return None
    # the rotary frequencies exactly as rope_cos_sin computes them
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
    return Plan(weights, meta, inv_freq, cfg.norm_eps)


def op():
    """The op's C++ entry: op()(ids [B, S] (or [B] for S = 1), pos with as many elements, k, v [L, B, G, T, C],
    cache_pos [B, T], slot, plan.held) -> logits [B, V] of each row's last token, the new keys written from `slot`
    on (a plan for B S rows). Not torch.ops' Python wrapper: it scans every argument for fake script objects at
    each call (an op taking a class does), ~10 us a step; ours are real."""
    packet = torch.ops.tinymixtral_gemv.decode_step
    return getattr(packet, "_op", packet)
