"""x @ W.T with a faster kernel choice for a few rows on the CPU (decode).

For a handful of rows a matrix product is a matrix-vector product: it only streams W from memory.
On the CPU torch runs that as one BLAS gemv that uses a single core (measured on this project's
2-core machine, fp32, torch 2.13: ~10 GB/s), while splitting W's rows into one block per thread and
running the blocks as a batched product (torch parallelises bmm over the batch) streams at ~25 GB/s,
the memory's full rate: the 32000 x 512 LM head goes from 6.7 ms to 2.6 ms. Same maths, other kernel.

Inside torch.compile (the compiled decode step) it is written as (x * w).sum(-1) instead: inductor
turns that into one vectorised, multi-threaded pass over w and fuses what comes before and after,
which is ~4x faster here than the bmm split as an external kernel in the compiled graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 16  # up to this many rows, split W over the threads (beyond, gemm is compute-bound and threaded)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for x [..., I] and w [O, I]."""
    O, I = w.shape
    M = x.numel() // I if I else 0
    if x.device.type != "cpu" or M > FEW_ROWS:
        return F.linear(x, w)
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
