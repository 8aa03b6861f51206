"""Moving token rows to their experts and back (Experts.forward in training), with gathers both ways.

Shapes: N tokens, K experts per token, M = N*K token-expert assignments, P rows of the experts' products (M plus
the padding of each expert's group, `pad_groups`), D model dim.

Indexing's own backward scatter-adds (`index_add`), and `embedding_bag`'s sorts its indices first; at a training
step's sizes either costs more than a product. Every move here is a permutation (each assignment has one row), so
each backward is a gather too: `embedding_bag` both gathers and sums (or weights) rows in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Gather(torch.autograd.Function):
    """Row m of the output is row rows[m] of x, and inverse says where each row's copies went: row n of the
    gradient sums grad[inverse[n*k + j]] over j, one embedding bag of k rows per token."""

    @staticmethod
    def forward(ctx, x, rows, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.k == 1:
            return grad.index_select(0, inverse), None, None, None
        return F.embedding_bag(inverse.view(-1, ctx.k), grad, mode="sum"), None, None, None


def gather_rows(x, rows, inverse, k: int = 1):
    """x[rows], where each of x's rows is taken k times: x.repeat_interleave(k, 0)[order] is
    gather_rows(x, order // k, inverse, k) with inverse the inverse permutation of order; a gather as backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Gather.apply(x, rows, inverse, k)
    return x.index_select(0, rows)


class _Combine(torch.autograd.Function):
    """y[n] = Σ_k w[n, k] y_P[slot[n, k]]. Backward: row p of y_P's gradient is w[a] g[a // K] for the assignment a
    in row p (zero for a padding row), one weighted bag of one row each; w's is y_P[slot[n, k]] · g[n]."""

    @staticmethod
    def forward(ctx, y_PD, slot_NK, w_NK, src_P):
        N, K = slot_NK.shape
        rows_P = (src_P // K).clamp(max=N - 1).view(-1, 1)  # padding rows (src M): any row, weighted by 0
        w_P = torch.cat([w_NK.detach().reshape(-1), w_NK.new_zeros(1)])[src_P].view(-1, 1)
        ctx.save_for_backward(y_PD, slot_NK, rows_P, w_P)
        return F.embedding_bag(slot_NK, y_PD, mode="sum", per_sample_weights=w_NK)

    @staticmethod
    def backward(ctx, g_ND):
        y_PD, slot_NK, rows_P, w_P = ctx.saved_tensors
        g_PD = g_NK = None
        if ctx.needs_input_grad[0]:
            g_PD = F.embedding_bag(rows_P, g_ND, mode="sum", per_sample_weights=w_P)
        if ctx.needs_input_grad[2]:
            N, K = slot_NK.shape
            g_NK = torch.linalg.vecdot(y_PD.index_select(0, slot_NK.reshape(-1)).view(N, K, -1), g_ND[:, None])
        return g_PD, None, g_NK, None


def combine(y_PD, slot_NK, w_NK, src_P):
    """Each token's K rows of y_PD weighted and summed: Σ_k w_NK[n, k] y_PD[slot_NK[n, k]] -> [N, D] (in y_PD's
    dtype, summed in fp32). src_P is pad_groups' (row p's assignment, M for padding); gathers as backward."""
    w_NK = w_NK.to(y_PD.dtype)
    if torch.is_grad_enabled() and (y_PD.requires_grad or w_NK.requires_grad):
        return _Combine.apply(y_PD, slot_NK, w_NK, src_P)
    return F.embedding_bag(slot_NK, y_PD, mode="sum", per_sample_weights=w_NK)


def pad_groups(order_M, counts_E, multiple: int = 1, fixed: bool = False):
    """Rows for the assignments in `order_M` (sorted by expert; counts_E each) when each expert's group is
    padded to a multiple of `multiple` rows: (slot_M, src_P, padded counts_E). slot_M[m] is assignment m's
    row; src_P[p] is row p's assignment, M for a padding row. multiple 1: slot_M is order_M's inverse.

    fixed: as many rows as any routing can need (the padding left over goes to the last group), so the sizes
    are known without reading counts_E: what a compiled graph can trace (a data-dependent size would break it)."""
    M = order_M.numel()
    pos_M = torch.arange(M, device=order_M.device)  # sorted position -> row
    if multiple == 1 and not fixed:
        return torch.empty_like(order_M).scatter_(0, order_M, pos_M), order_M, counts_E
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)
    pos_M = pos_M + shift_E.repeat_interleave(counts_E, output_size=M)
    slot_M = torch.empty_like(order_M).scatter_(0, order_M, pos_M)
    if fixed:
        P = (M + len(counts_E) * (multiple - 1)) // multiple * multiple  # the most the groups padded can take
        padded_E[-1] += P - padded_E.sum()
    else:
        P = int(padded_E.sum())
    src_P = torch.full((P,), M, dtype=order_M.dtype, device=order_M.device)
    return slot_M, src_P.scatter_(0, pos_M, order_M), padded_E
