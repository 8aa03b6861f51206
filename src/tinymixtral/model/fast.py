"""Faster kernels for the model's matrix products, and the one place that picks them (`experts_path`).

Each computes exactly what the plain code computes (the tests hold every path against a reference);
only the kernel differs. Shapes: N tokens, M = N*K token-expert rows, I in, O out, E experts.

- `linear(x, w)`: x @ w.T. For a handful of rows (decode) a matrix product is a matrix-vector product:
  it only streams w from memory. On the CPU torch runs that as one BLAS gemv on a single core (measured
  on this project's 2-core machine, fp32, torch 2.13: ~10 GB/s); splitting w's rows into one block per
  thread and running the blocks as one batched product streams at ~25 GB/s, the memory's full rate (the
  32000 x 512 LM head: 6.7 ms -> 2.6 ms). Inside torch.compile it is written as (x * w).sum(-1) (`mv`):
  inductor makes that one vectorised, multi-threaded pass over w, ~4x faster here than the bmm split.
  Where the CPU has AVX2 + FMA, `gemv.py`'s kernel takes these products instead, eager and compiled.
- `grouped_mm`: rows grouped by expert times each expert's weight, in one call where torch has it.
- `experts_few` / `experts_gathered`: the MoE for a few tokens at inference, reading only the chosen
  experts (`Experts.forward` would sort, count and visit every expert).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv

FEW_ROWS = 16  # up to this many rows, split w over the threads (beyond, gemm is compute-bound and threaded)


# ---- dense products ---------------------------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for x [..., I] and w [O, I]."""
    O, I = w.shape
    M = x.numel() // I if I else 0
    if x.device.type != "cpu" or M > FEW_ROWS:
        return F.linear(x, w)
    if gemv.applies(x, w):  # AVX2: one pass over w on all threads, eager and compiled
        return gemv.linear(x, w)
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return mv(x, w)
    T = torch.get_num_threads()
    if T < 2 or O % T or not w.is_contiguous():
        return F.linear(x, w)
    x_IM = x.reshape(M, I).T
    y_TOM = torch.bmm(w.view(T, O // T, I), x_IM.expand(T, I, M))  # [T, O/T, M]: block t = rows t*O/T...
    return y_TOM.permute(2, 0, 1).reshape(*x.shape[:-1], O)


def mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., I] times w [..., O, I] (w broadcast over x's leading dims) as a product-and-sum: what
    torch.compile makes into a fused reduction. Eager it would build the whole product: compile only."""
    return (x[..., None, :] * w).sum(-1)


class Linear(nn.Linear):
    """nn.Linear without bias whose forward is `linear` (same parameters, same state-dict keys)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight)


# ---- grouped products (experts) ---------------------------------------------------------------------
_GROUPED_MM_OK: dict[tuple, bool] = {}  # (device type, dtype) -> whether torch's grouped_mm ran


def grouped_mm(x_MI, w_EIO, offs_E, counts_E):
    """x rows grouped by expert (group e ends at offs[e]) times w[e]: [M, I] x [E, I, O] -> [M, O].

    torch.nn.functional.grouped_mm does it in one call (CPU kernel since torch 2.9; CUDA needs sm80+).
    Where it is missing or refuses the dtype/device, fall back to one matmul per expert. Compiled code traces it
    in bf16 (its meta kernel takes nothing else), so a compiled MoE stays one graph; other dtypes run eagerly.
    """
    aligned = all(n * x_MI.element_size() % 16 == 0 for n in (x_MI.shape[-1], w_EIO.shape[-1]))
    if (torch.compiler.is_compiling() and aligned and x_MI.dtype == w_EIO.dtype == torch.bfloat16
            and _GROUPED_MM_OK.get((x_MI.device.type, x_MI.dtype), hasattr(F, "grouped_mm"))):
        return F.grouped_mm(x_MI, w_EIO, offs=offs_E)
    return _grouped_mm_eager(x_MI, w_EIO, offs_E, counts_E, aligned)


@torch.compiler.disable  # its meta kernel wants bf16 inputs: other dtypes run eagerly inside compiled code
def _grouped_mm_eager(x_MI, w_EIO, offs_E, counts_E, aligned: bool):
    key = (x_MI.device.type, x_MI.dtype)
    # grouped_mm wants 16-byte-aligned row strides (forward and backward); that depends on the shape,
    # not on (device, dtype), so check it here rather than letting the cache turn it into an error.
    if aligned and _GROUPED_MM_OK.get(key, hasattr(F, "grouped_mm")):
        try:
            out = F.grouped_mm(x_MI, w_EIO, offs=offs_E)
            _GROUPED_MM_OK[key] = True
            if out.requires_grad:  # its backward refuses expanded (stride-0) gradients such as .sum()'s
                out.register_hook(torch.Tensor.contiguous)
            return out
        except (RuntimeError, NotImplementedError) as e:
            if key in _GROUPED_MM_OK:  # it worked before: a real error, not a missing kernel
                raise
            warnings.warn(f"grouped_mm unavailable for {key} ({e}); using a per-expert loop", stacklevel=2)
            _GROUPED_MM_OK[key] = False
    return grouped_mm_loop(x_MI, w_EIO, counts_E)


def grouped_mm_loop(x_MI, w_EIO, counts_E):
    """The per-expert loop that grouped_mm replaces (one host sync for the counts)."""
    chunks = x_MI.split(counts_E.tolist())
    return torch.cat([c @ w_EIO[e] for e, c in enumerate(chunks)], dim=0)


def group_rows(x) -> int:
    """Pad each expert's group of rows to a multiple of this (Experts.forward): 128 for a CPU's bf16/fp16
    products, 1 elsewhere. torch runs those through oneDNN, which builds (JIT-compiles) a kernel for each new
    shape: ~6 ms, where the product itself takes ~0.7 ms (2,366 x 256 x 1,024 bf16, AMX), and the experts' row
    counts change at every step. Padded, a run sees a few dozen shapes, each built once."""
    return 128 if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else 1


# ---- the MoE for a few tokens at inference ----------------------------------------------------------
def experts_path(n_tokens: int, top_k: int, n_experts: int, capacity: int | None, gathers: bool = False):
    """The kernel for one Experts call: experts_gathered, experts_few, or None for the general
    dispatch -> grouped products -> combine of Experts.forward (training, capacity, long prefill).
    gathers: whether the module's products take one expert per row eagerly without copying weights (our
    kernels: each chosen expert read once for up to 4 of its rows), so a short prompt's prefill goes that way too."""
    if capacity is not None or torch.is_grad_enabled():
        return None
    if n_tokens <= FEW_ROWS and (gathers or torch.compiler.is_compiling()):
        return experts_gathered  # a decode step or a short prefill: no host sync, no data-dependent shape
    if n_tokens * top_k <= n_experts:
        return experts_few  # eager decode: fewer assignments than experts
    return None


def experts_few(experts, x_ND, weights_NK, experts_NK):
    """Σ_k weight_k · expert_k(x) for a handful of tokens: one matrix-vector product per chosen expert.

    Sorting, counting and scattering cost more than the products themselves at batch 1, and grouped_mm
    visits every expert, chosen or not. Here the choices come to the host (one sync, as any sampler
    makes anyway) and each chosen expert multiplies just its own tokens, through experts.expert_mm.
    """
    if x_ND.shape[0] == 1:  # batch-1 decode: the same sums in fewer small ops (no zeros, no scatter)
        y_ND, w_K = None, weights_NK[0].to(x_ND.dtype)
        for k, e in enumerate(experts_NK[0].tolist()):
            gate, up = experts.expert_mm(x_ND, "w13", e).chunk(2, dim=-1)
            y = experts.expert_mm(F.silu(gate) * up, "w2", e) * w_K[k]
            y_ND = y if y_ND is None else y_ND + y
        return y_ND
    groups: dict[int, list[tuple[int, float]]] = {}  # expert -> [(token, weight)]
    for n, (chosen, weights) in enumerate(zip(experts_NK.tolist(), weights_NK.tolist())):
        for e, w in zip(chosen, weights):
            groups.setdefault(e, []).append((n, w))
    y_ND = torch.zeros_like(x_ND)
    for e, members in groups.items():
        tokens, weights = zip(*members)  # distinct tokens: a token picks an expert at most once
        # one token (always so at batch 1): a view, not a gather
        rows = slice(tokens[0], tokens[0] + 1) if len(tokens) == 1 else torch.tensor(tokens, device=x_ND.device)
        w_M1 = torch.tensor(weights, dtype=x_ND.dtype, device=x_ND.device)[:, None]
        gate, up = experts.expert_mm(x_ND[rows], "w13", e).chunk(2, dim=-1)
        y_ND[rows] += experts.expert_mm(F.silu(gate) * up, "w2", e) * w_M1
    return y_ND


def experts_gathered(experts, x_ND, weights_NK, experts_NK):
    """The same sums with no host sync and no data-dependent shape, for a compiled decode step, or eagerly where
    the products are our kernels (`experts_path`'s `gathers`).

    Each row's k-th expert is indexed by a tensor: expert_mm(x, name, e_N) multiplies row n by expert
    e_N[n]'s weight. torch.compile fuses the gather into the product, so only the chosen experts'
    weights are read (gpt-fast's decode trick). Eager, a plain gather would copy them first.
    All K choices go in one product each (row n*K + k: token n and its k-th expert): half the kernel calls
    of a product per choice at top-2, which is what a quantized decode step's time was made of.
    """
    N, K = experts_NK.shape
    x_MD = x_ND[:, None].expand(N, K, x_ND.shape[-1]).reshape(N * K, x_ND.shape[-1])
    e_M = experts_NK.reshape(N * K)
    gate, up = experts.expert_mm(x_MD, "w13", e_M).chunk(2, dim=-1)  # [N K, 2F]
    y_NKD = experts.expert_mm(F.silu(gate) * up, "w2", e_M).view(N, K, -1)
    return (y_NKD * weights_NK[..., None].to(x_ND.dtype)).sum(1)


# ---- dropout ------------------------------------------------------------------------------------------
def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout(x, p) for training: each element zeroed with probability p, the rest scaled by 1 / (1 - p).

    On a CPU the mask comes from 16 random bits an element, four to one 64-bit draw of torch's generator (so p is
    rounded to a multiple of 1/65536): torch's own CPU dropout draws one number an element, ~6 ms for 16 x 256 x 256
    here against ~2 ms this way, and a demo-size training step with dropout draws nine such masks (~10 % of it)."""
    if x.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(x, p)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1).view(torch.int16)[:n]
    keep = bits.view(x.shape) >= round(p * 65536) - 32768  # int16 uniform over [-32768, 32767]
    return x * (keep * (1.0 / (1.0 - p))).to(x.dtype)
