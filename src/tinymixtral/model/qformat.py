"""The quantized weight format: int8 / int4 quantize and dequantize, pure functions of tensors.

Schemes (w is one weight matrix [N out, K in]; each expert of a stack is quantized on its own):
- int8: symmetric per output channel. s = max|w_row| / 127, q = round(w / s) in [-127, 127], w ~ q * s.
  Error per element <= s / 2 of its row.
- int4: asymmetric, in groups of `group_size` along the input dim (gpt-fast's scheme, the CPU kernel's
  layout). s = (max - min) / 15 rounded up to a bf16 value, zero = min + 8 s rounded to bf16, q = round((w -
  (zero - 8 s)) / s) in [0, 15], w ~ (q - 8) s + zero. Error per element <= max(s / 2, |zero| / 256) of its
  group (the second: the zero's rounding, at the clamped ends; it is the smaller where |zero| <= 128 s).
Stored (safetensors): `weight` int8 [N, K] or uint8 [N, K/2] (two 4-bit values per byte, the even column in
the low nibble), `scales` fp32 [N, 1] or [N, K/g], `zeros` fp32 [N, K/g] (int4 only; in a bf16 model, bf16).
Kernel operands are made at the first forward on a device and cached; the AVX2 kernels hold int4 scales and
zeros that are bf16 values in bf16 (quant._Quantized._compact).
"""

from __future__ import annotations

import torch

from .cpu_kernels import pack_nibbles, unpack_kernel_layout, unpack_nibbles


# ---- pure functions of tensors ([..., N, K]: per row, over the last dim) ----------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., N, K], scales fp32 [..., N, 1]): symmetric, per output channel."""
    w = w.float()
    scales = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127  # all-zero rows: q = 0, no NaN
    return (w / scales).round().clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [..., N, K/2], scales [..., N, G], zeros [..., N, G]), G = K / group_size. Scales and zeros
    are bf16 values (in fp32 tensors): the CPU kernels then hold them in bf16 (_Quantized._compact), half the bytes."""
    *lead, N, K = w.shape
    assert K % group_size == 0 and group_size % 2 == 0, f"group_size {group_size} must be even and divide K={K}"
    g = w.float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = bf16_ceil((hi - lo).clamp(min=1e-12) / 15)  # 15 steps still span the group
    zeros = (lo + 8 * scales).bfloat16().float()
    low = zeros - 8 * scales  # lo, moved by the zero's rounding (a constant group: q = 8 and w = zeros exactly)
    q = ((g - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    return pack_nibbles(q.reshape(*lead, N, K)), scales, zeros


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The least bf16 value >= x, for positive finite fp32 x (the low 16 bits rounded up), as fp32."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               block: int | None = None) -> torch.Tensor:
    """fp32 weight [..., N, K] back from int8 (zeros None) or packed int4 (in the CPU kernel's layout if
    `block` is given); the group size is K / scales.shape[-1]."""
    if zeros is None:
        return weight.float() * scales.float()
    q = unpack_kernel_layout(weight, block) if block else unpack_nibbles(weight)
    *lead, N, K = q.shape
    g = q.reshape(*lead, N, scales.shape[-1], -1).float()
    return ((g - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(*lead, N, K)


def quantize(w: torch.Tensor, bits: int, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """{'weight', 'scales'[, 'zeros']} for a weight [..., N, K]."""
    return dict(zip(("weight", "scales", "zeros"), quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)))
