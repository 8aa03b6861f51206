"""fp32 / bf16 products for a few rows (batch-1 decode) through tinymixtral's AVX2 kernels (`csrc/gemv_avx2.cpp`,
built with the int8/int4 ones by `kernel_build.load_avx2`), and a decode step's attention and routing
(`csrc/decode_avx2.cpp`).

A decode step only streams weights from memory. These kernels read each weight row once, 4 rows per inner
iteration on all threads (torch's pool), and run the chosen experts of a few tokens (both products and
SwiGLU) as one op with two parallel passes, where the plain code runs ~20 small ops per layer. They are plain
torch ops with fake (shape-only) kernels, so a compiled step calls them as they are. Where the CPU lacks
AVX2 + FMA, with TINYMIXTRAL_KERNELS=torch, when the build fails, or under autograd, nothing changes: the
callers (`fast.linear`, `Experts.forward`) keep their own paths.
"""

from __future__ import annotations

import torch

from . import cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)


def ready() -> bool:
    """Whether the kernels are loaded: they are built and loaded with the int8/int4 ones (and their fake kernels
    registered there)."""
    return cpu_kernels.avx2_kernels()


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x [..., K] @ w^T (or the experts of w) can run here: CPU, inference, fp32 or bf16 in both."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and not torch.is_grad_enabled()
            and x.dtype == w.dtype and w.dtype in DTYPES and w.is_contiguous() and ready())


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for x [..., K], w [N, K] (contiguous), a few rows of x."""
    x_MK = x.reshape(-1, x.shape[-1])
    y = torch.ops.tinymixtral_gemv.mv(x_MK if x_MK.stride(-1) == 1 else x_MK.contiguous(), w)
    return y.view(*x.shape[:-1], w.shape[0])


def attention(q_BHC, k_BGTC, v_BGTC, allowed_BT, scale: float) -> torch.Tensor:
    """SDPA of one query per row and head over the cached keys it may see (allowed_BT), grouped-query (`decode_avx2.cpp`):
    one call where SDPA's fixed costs took ~50-80 us a layer at batch 1. q [B, H, C]; k, v [B, G, T, C] (views)."""
    return torch.ops.tinymixtral_gemv.attn_decode(q_BHC.contiguous(), k_BGTC, v_BGTC, allowed_BT.contiguous(), scale)


def attention_applies(q, k) -> bool:
    """Whether attention() can run: CPU, inference, fp32 or bf16 throughout, unit stride along the head dim."""
    return (q.device.type == "cpu" and k.device.type == "cpu" and not torch.is_grad_enabled() and q.dtype == k.dtype
            and q.dtype in DTYPES and k.stride(-1) == 1 and ready())


def route(x_ND, w_ED, top_k: int):
    """Mixtral's routing in one call: (logits [N, E] fp32, renormalised top-k weights [N, K] fp32, experts [N, K])."""
    return torch.ops.tinymixtral_gemv.route(x_ND, w_ED, top_k)


def argmax(x_BV) -> torch.Tensor:
    """x_BV.argmax(-1) for fp32 logits on the CPU in two vector passes: torch's took 20-70 us a token here."""
    return torch.ops.tinymixtral_gemv.argmax(x_BV)


def argmax_applies(x) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(-1) == 1 and ready()


def experts(x_ND, w13_EHD, w2_EDF, experts_NK, weights_NK) -> torch.Tensor:
    """Σ_k weights[n, k] * w2_e(silu(w1_e x_n) * w3_e x_n), e = experts[n, k]: Experts.forward for a few tokens."""
    return torch.ops.tinymixtral_gemv.experts_mv(x_ND.contiguous(), w13_EHD, w2_EDF, experts_NK.contiguous(),
                                                 weights_NK.float().contiguous())

