"""The CPU weight-only kernels for int8 / int4 weights: when they apply, their operands, the call, and
the layout of torch's int4 kernel (so the model can hold its int4 weights in that layout, once).

Two sets of kernels. Where the CPU has AVX2 + FMA, tinymixtral's own (`csrc/*.cpp`, built on first use with torch's
cpp_extension and cached in torch's extensions directory). They read each weight once and int4 in our storage
layout. For up to `Q8_ROWS` rows (decode; where the CPU has VNNI, every row count they take) `csrc/woq_q8.cpp`
quantizes the activations to int8 in blocks of 32 (one fp32 scale each, once per call) and multiplies in integers,
as llama.cpp's Q8_0 / Q4_0 dot products do (in one VNNI instruction per 32 bytes where the CPU has AVX512-VNNI or
AVX-VNNI, and with the next rows' weights prefetched): the result is that of the activations rounded to 8 bits per
block (relative error ~5e-3 of the output's scale on random data). QUANT_ACTIVATIONS = False, or
TINYMIXTRAL_KERNELS=exact, keeps the activations exact: `csrc/woq_avx2.cpp` dequantizes the weight in registers and
sums fp32 products, as it does for Q8_ROWS < rows <= `AVX2_ROWS`. More rows (prefill) dequantize and run one fp32
matmul. Elsewhere, or with TINYMIXTRAL_KERNELS=torch, or if the build fails (one warning line): torch's
`_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`, vectorised for bf16 activations.

`_weight_int4pack_mm_for_cpu` reads an int4 weight [N, K] re-packed by `_convert_weight_to_int4pack_for_cpu`:
rows in blocks of B (32 on this AVX2 machine; the block depends on the CPU build), and in each block, for
each input column k, B/2 bytes whose low nibbles are rows 0..B/2-1 and high nibbles rows B/2..B-1. That
is a fixed permutation of the nibbles of our storage layout (row-major, even column in the low nibble),
so `to_kernel_layout` / `from_kernel_layout` convert with tensor ops, and the model keeps only the
kernel's copy instead of both. B is found by `int4_block()`, which checks our permutation against
torch's converter once per process.
"""

from __future__ import annotations

import functools
import os

import torch

from .kernel_build import cpuinfo, load_avx2, native_bf16, vnni_flags  # noqa: F401  (vnni_flags: re-exported)

GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel accepts


def _avx2_rows() -> int:
    """Up to this many rows the AVX2 kernels; more (long prefill chunks): dequantize (`dequant`), then one matmul,
    in bf16 where the CPU multiplies bf16 natively (`native_bf16`), else fp32 (torch's, AVX-512 where the CPU has
    it). On an AMD EPYC with AVX-512 but no bf16, at 256 rows the kernels took 0.43-0.80x of the fp32 path's time
    (int4 / int8, 4096 x 4096 to 14336 x 4096; tiny-mixtral prefill of 256 tokens 1.25x faster than with 64); at 512
    rows the two measured the same. On an Intel Xeon with AVX-512 (full-width FMA) the fp32 matmul wins from 32 rows:
    tiny-mixtral prefill of 256 tokens, int8 470 -> 861 tokens/s, int4 365 -> 578 (256 -> 32). On an AMD EPYC with
    AVX512-BF16 the bf16 matmul wins from 64 rows (4096 x 1024: 2.7 against 3.6 ms at 64 rows, 4.3 against 11.8 at
    256; 1536 x 256: 0.20 against 0.31 ms at 64)."""
    info = cpuinfo()
    return 32 if "GenuineIntel" in info and " avx512f" in info else 64 if native_bf16() else 256


AVX2_ROWS = _avx2_rows()
# Up to this many rows, int8 activations (woq_q8.cpp; a K or group size that is not a multiple of 32 keeps them
# exact). Without VNNI (maddubs + madd), 1 thread, 4096 x 4096: int8 1.25x the exact kernel at 1 row, 1.2x at 2,
# 0.95x at 4-8; int4 1.5-2.5x: 8 rows. With VNNI (one instruction per 4 bytes) at every row count our kernels take:
# AMD EPYC with AVX512-VNNI, 2 threads, 4096 x 1024, int8 2.3x the exact kernel at 32 rows, 1.7x at 256, int4
# 1.6x and 1.3x, and faster than the fp32 matmul on the dequantized weight (1.6-2.8x at 32-256 rows).
Q8_ROWS = AVX2_ROWS if vnni_flags(cpuinfo()) else 8
QUANT_ACTIVATIONS = os.environ.get("TINYMIXTRAL_KERNELS", "").lower() != "exact"


_AVX2: list[bool] = []  # the answer, once known


def avx2_kernels() -> bool:
    """Whether tinymixtral's AVX2 kernels are loaded (built here on first use, then cached on disk). Compiled
    code takes the answer of the eager calls before it (generation prefills eagerly)."""
    if torch.compiler.is_compiling():
        return bool(_AVX2 and _AVX2[0])
    if not _AVX2:
        _AVX2.append(load_avx2())
        if _AVX2[0]:
            _register_fakes()
    return _AVX2[0]


def _register_fakes():
    """Shape-only kernels of every op in the extension, so that compiled code calls them itself (no Python op
    around them): the weight-only products [M, N], gemv's `mv` [M, N] and `experts_mv` (x's shape), the decode
    step's `attn_decode` (q's shape) and `route` (logits [N, E], weights and experts [N, k])."""
    for op in ("int8_mm", "int8_q8_mm", "int4_mm", "int4_q8_mm"):
        torch.library.register_fake(f"tinymixtral_avx2::{op}")(lambda x, w, *rest: x.new_empty(x.shape[0], w.shape[-2]))
    torch.library.register_fake("tinymixtral_avx2::dequant")(
        lambda w, s, z, g, bf16: w.new_empty(*w.shape[:-1], w.shape[-1] * (1 if z is None else 2),
                                             dtype=torch.bfloat16 if bf16 else torch.float32))
    torch.library.register_fake("tinymixtral_gemv::mv")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("tinymixtral_gemv::experts_mv")(lambda x, *rest: x.new_empty(x.shape))
    torch.library.register_fake("tinymixtral_gemv::argmax")(lambda x: x.new_empty(x.shape[0], dtype=torch.long))
    torch.library.register_fake("tinymixtral_gemv::attn_decode")(lambda q, *rest: q.new_empty(q.shape))
    torch.library.register_fake("tinymixtral_gemv::route")(
        lambda x, w, k: (x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32),
                         x.new_empty(x.shape[0], k, dtype=torch.float32), x.new_empty(x.shape[0], k, dtype=torch.long)))


# int4: ours (storage layout) where set, else torch's kernel in its own layout. With fp32 activations ours ran slower
# than torch's at one row here (Mistral-7B shape: 0.43 against 0.65 tok/s); with int8 activations (the default) it
# reads 1.9-2.4x faster than torch's at one row (benchmarks/woq_kernels.py, 1 thread), so it is on.
INT4_OURS = True


def ours(bits: int) -> bool:
    """Whether weights of `bits` run tinymixtral's AVX2 kernel (int8 where it loads; int4 with INT4_OURS)."""
    return (bits == 8 or INT4_OURS) and avx2_kernels()


def kernel_applies(bits: int, n_out: int, group_size: int | None, device: torch.device) -> bool:
    """Whether a CPU weight-only kernel takes this weight (otherwise: dequantize, then matmul)."""
    if device.type != "cpu":
        return False
    if ours(bits):
        return bits == 8 or group_size % 16 == 0
    if bits == 8:
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")
    return n_out % 16 == 0 and group_size in GROUP_SIZES and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def kernel_matmul(x_MK, weight, scales, zeros, group_size: int | None, experts_M=None) -> torch.Tensor:
    """x [M, K] (contiguous, in the compute dtype) @ W^T -> [M, N], with the operands of `kernel_operands`.
    With experts_M [M], weight, scales and zeros are stacks [E, ...] and row m uses expert experts_M[m]."""
    if _for_ours(weight, scales, zeros):
        if not calls_ours((weight, scales, zeros), x_MK.shape[0], experts_M is not None):  # long prefill: one gemm
            dtype = torch.bfloat16 if QUANT_ACTIVATIONS and native_bf16() else torch.float32  # "exact": fp32
            w = torch.ops.tinymixtral_avx2.dequant(weight, scales, zeros, group_size or 0, dtype == torch.bfloat16)
            return torch.nn.functional.linear(x_MK.to(dtype), w).to(x_MK.dtype)
        experts_M = None if experts_M is None else experts_M.contiguous()  # the kernels read it as a plain array
        ops, q8 = torch.ops.tinymixtral_avx2, q8_applies(x_MK.shape[0], weight.shape[-1], group_size)
        if zeros is None:
            return (ops.int8_q8_mm if q8 else ops.int8_mm)(x_MK, weight, scales, experts_M)
        return (ops.int4_q8_mm if q8 else ops.int4_mm)(x_MK, weight, scales, zeros, group_size, experts_M)
    if experts_M is not None:
        return torch.cat([kernel_matmul(x_MK[m:m + 1], weight[e], scales[e], None, group_size)
                          for m, e in enumerate(experts_M.tolist())])
    if group_size is None:
        return torch.ops.aten._weight_int8pack_mm(x_MK, weight, scales)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x_MK, weight, group_size, scales)


def _for_ours(weight, scales, zeros) -> bool:
    """Whether operands of `kernel_operands` are for our kernels (int4 with zeros; int8 with fp32 scales)."""
    return zeros is not None or (scales.dtype == torch.float32 and weight.dtype == torch.int8 and ours(8))


def calls_ours(operands: tuple, rows: int, experts: bool) -> bool:
    """Whether `kernel_matmul` on these operands (of `kernel_operands`) calls one of our C++ ops straight away,
    with no decision on values: compiled code can then call it itself rather than through `woq_mm`."""
    return _for_ours(*operands) and (rows <= AVX2_ROWS or experts)


def q8_applies(M: int, K: int, group_size: int | None) -> bool:
    """Whether our kernel quantizes the activations of an [M, K] product (int8 weights: group_size None)."""
    return QUANT_ACTIVATIONS and M <= Q8_ROWS and (K if group_size is None else group_size) % 32 == 0


@torch.library.custom_op("tinymixtral::woq_mm", mutates_args=(), schema=(
    "(Tensor x, Tensor weight, Tensor scales, Tensor? zeros, int group_size, Tensor? experts) -> Tensor"))
def woq_mm(x_MK, weight, scales, zeros, group_size, experts_M):
    """`kernel_matmul` as one opaque op (group_size 0: int8), so that compiled code calls the kernel as it is
    (inductor would otherwise rewrite the product). With experts_M [M], weight and scales are stacks [E, ...]
    and row m is multiplied by expert experts_M[m]: views of the stacks, nothing gathered or copied."""
    return kernel_matmul(x_MK.contiguous(), weight, scales, zeros, group_size or None, experts_M)


@woq_mm.register_fake
def _(x_MK, weight, scales, zeros, group_size, experts_M):
    return x_MK.new_empty(x_MK.shape[0], weight.shape[-2])


def kernel_operands(weight, scales, zeros, dtype: torch.dtype, in_layout: bool) -> tuple:
    """The kernel's operands for a weight [..., N, K] (all experts of a stack), (weight, scales, zeros or None).
    AVX2 kernels: the module's own tensors (int8 scales as [..., N] fp32; int4 scales and zeros as stored, fp32
    or bf16, so that a bf16 model's int4 scales are not held twice). torch's: the int8 weight with scales in
    `dtype`, or the int4 weight in its layout (itself if `in_layout`, else a converted copy) with its
    scales_and_zeros."""
    if ours(8 if zeros is None else 4):
        if zeros is None:
            return weight.contiguous(), scales[..., 0].float().contiguous(), None
        keep = scales.dtype == zeros.dtype and scales.dtype in (torch.float32, torch.bfloat16)
        return (weight, *[t.contiguous() if keep else t.float().contiguous() for t in (scales, zeros)])
    if zeros is None:
        return weight.contiguous(), scales[..., 0].to(dtype).contiguous(), None
    q = weight if in_layout else torch.stack([
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(w).to(torch.int32), 1)
        for w in weight.reshape(-1, *weight.shape[-2:])]).reshape(weight.shape)
    return q, scales_and_zeros(scales, zeros, dtype), None


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


def storage_copy(packed: torch.Tensor, block: int) -> torch.Tensor:
    """A copy of int4 weights [..., N, K/2] in the kernel's layout, in the storage layout (one matrix at a time)."""
    out = torch.empty_like(packed)
    for src, dst in zip(packed.reshape(-1, *packed.shape[-2:]), out.view(-1, *packed.shape[-2:])):
        dst.copy_(pack_nibbles(unpack_kernel_layout(src, block)))
    return out


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
