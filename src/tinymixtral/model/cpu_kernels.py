"""torch's CPU weight-only kernels for int8 / int4 weights: when they apply, their operands, the call, and
the int4 kernel's own weight layout (so the model can hold its int4 weights in that layout, once).

`_weight_int4pack_mm_for_cpu` reads an int4 weight [N, K] re-packed by `_convert_weight_to_int4pack_for_cpu`:
rows in blocks of B (32 on this AVX2 machine; the block depends on the CPU build), and in each block, for
each input column k, B/2 bytes whose low nibbles are rows 0..B/2-1 and high nibbles rows B/2..B-1. That
is a fixed permutation of the nibbles of our storage layout (row-major, even column in the low nibble),
so `to_kernel_layout` / `from_kernel_layout` convert with tensor ops, and the model keeps only the
kernel's copy instead of both (an int4 model used to take twice its size once it ran). B is found by
`int4_block()`, which checks our permutation against torch's converter once per process.
"""

from __future__ import annotations

import functools

import torch

GROUP_SIZES = (32, 64, 128, 256)  # what the int4 CPU kernel accepts


def kernel_applies(bits: int, n_out: int, group_size: int | None, device: torch.device) -> bool:
    """Whether torch's CPU weight-only kernel takes this weight (otherwise: dequantize, then matmul)."""
    if device.type != "cpu":
        return False
    if bits == 8:
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")
    return n_out % 16 == 0 and group_size in GROUP_SIZES and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def kernel_matmul(x_MK, weight, scales, group_size: int | None) -> torch.Tensor:
    """x [M, K] (contiguous, in the scales' dtype) @ W^T -> [M, N]; weight int8 [N, K] with scales [N], or
    int4 in the kernel's layout with scales_and_zeros [G, N, 2]."""
    if group_size is None:
        return torch.ops.aten._weight_int8pack_mm(x_MK, weight, scales)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x_MK, weight, group_size, scales)


@torch.library.custom_op("tinymixtral::woq_mm", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor scales, int group_size, Tensor? experts) -> Tensor")
def woq_mm(x_MK, weight, scales, group_size, experts_M):
    """`kernel_matmul` as one opaque op (group_size 0: int8), so that compiled code calls the kernel as it is
    (inductor would otherwise rewrite the product). With experts_M [M], weight and scales are stacks [E, ...]
    and row m is multiplied by expert experts_M[m]: views of the stacks, nothing gathered or copied."""
    x_MK, g = x_MK.contiguous(), group_size or None
    if experts_M is None:
        return kernel_matmul(x_MK, weight, scales, g)
    return torch.cat([kernel_matmul(x_MK[m:m + 1], weight[e], scales[e], g) for m, e in enumerate(experts_M.tolist())])


@woq_mm.register_fake
def _(x_MK, weight, scales, group_size, experts_M):
    return x_MK.new_empty(x_MK.shape[0], weight.shape[-2])


def kernel_operands(weight, scales, zeros, dtype: torch.dtype, in_layout: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's operands for a weight [..., N, K] (all experts of a stack): (int8 weight, scales [..., N])
    or (int4 weight in the kernel's layout: itself if `in_layout`, else a converted copy, scales_and_zeros)."""
    if zeros is None:
        return weight.contiguous(), scales[..., 0].to(dtype).contiguous()
    q = weight if in_layout else torch.stack([
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(w).to(torch.int32), 1)
        for w in weight.reshape(-1, *weight.shape[-2:])]).reshape(weight.shape)
    return q, scales_and_zeros(scales, zeros, dtype)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernel's [..., G, N, 2] from our scales and zeros [..., N, G]."""
    return torch.stack([scales.mT, zeros.mT], dim=-1).to(dtype).contiguous()


# ---- int4 layouts: ours (storage) and the kernel's -------------------------------------------------
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] -> [..., K/2]: column 2j in the low nibble, 2j+1 in the high one."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def to_kernel_layout(q: torch.Tensor, block: int) -> torch.Tensor:
    """int4 values 0..15 (uint8 [N, K], N % block == 0) -> the kernel's packed bytes [N, K/2]."""
    N, K = q.shape
    b = q.reshape(N // block, 2, block // 2, K)
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).reshape(N, K // 2)


def unpack_kernel_layout(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The kernel's packed bytes [..., N, K/2] -> int4 values 0..15 (uint8 [..., N, K])."""
    *lead, N, half = packed.shape
    p = packed.reshape(*lead, N // block, 2 * half, block // 2)  # [.., blocks, K, block/2]
    q = torch.stack([p & 15, p >> 4], dim=-3)  # [.., blocks, 2, K, block/2]
    return q.transpose(-1, -2).reshape(*lead, N, 2 * half)


@functools.cache
def int4_block() -> int | None:
    """The row block of this torch build's int4 CPU layout, if `to_kernel_layout` reproduces it (else None:
    the model then keeps a converted copy next to its own)."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    q = torch.randint(0, 16, (256, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (16, 32, 64, 128):
        if want.shape == (256, 32) and torch.equal(to_kernel_layout(q.to(torch.uint8), block), want):
            return block
    return None
