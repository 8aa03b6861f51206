"""Sparse mixture of SwiGLU experts (Mixtral), the dense SwiGLU FFN (Mistral), and router losses.

Shapes: N tokens (B*S flattened), D model dim, F expert hidden dim, E experts, K experts per token,
M = N*K token-expert assignments.

Routing is Mixtral's: softmax over all E router logits, keep the top K, renormalise them to sum to 1.
That equals a softmax over the K largest logits alone (the common factor cancels); we use the first
form because it is transformers' and so picks the same experts on ties.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import FEW_ROWS, Linear, linear, mv


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul (gate rows first)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w13 = Linear(d_model, 2 * d_ff)
        self.w2 = Linear(d_ff, d_model)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


@dataclass
class Routing:
    """What the router decided for one layer's tokens in the last forward pass."""

    logits_NE: torch.Tensor  # fp32 router logits (of the jittered input if jitter is on; before gating noise)
    weights_NK: torch.Tensor  # renormalised weights of the chosen experts
    experts_NK: torch.Tensor  # chosen expert ids, best first
    n_dropped: int | torch.Tensor = 0  # assignments over capacity (only with capacity_factor)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.jitter = cfg.top_k, cfg.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        # Noisy top-k gating (Shazeer et al. 2017, eq. 4; makeMoE): per-expert noise scale learned from x.
        self.noise = nn.Linear(cfg.d_model, cfg.n_experts, bias=False) if cfg.noisy_gating else None

    def forward(self, x_ND):
        """Returns (logits_NE in fp32, weights_NK, experts_NK)."""
        if self.training and self.jitter > 0:  # Switch Transformer jitter: on the router input only
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_NE = F.linear(x_ND, self.weight).float()
        select_NE = logits_NE
        if self.training and self.noise is not None:
            select_NE = logits_NE + torch.randn_like(logits_NE) * F.softplus(self.noise(x_ND).float())
        probs_NE = select_NE.softmax(dim=-1)
        weights_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return logits_NE, weights_NK, experts_NK


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w13 [E, 2F, D] (gate rows, then up rows) and w2 [E, D, F].

    This is transformers 5's in-memory layout (gate_up_proj, down_proj), so its fused checkpoints
    load without reshaping.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.w13 = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_ff, cfg.d_model))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ff))

    def forward(self, x_ND, weights_NK, experts_NK, capacity: int | None = None):
        """Σ_k weight_k · expert_k(x): tokens sorted by expert, each group one matrix product."""
        N, K = experts_NK.shape
        E = self.n_experts
        if capacity is None and not torch.is_grad_enabled():
            if torch.compiler.is_compiling() and N <= FEW_ROWS:
                return self.forward_gathered(x_ND, weights_NK, experts_NK), 0
            if N * K <= E:
                return self.forward_few(x_ND, weights_NK, experts_NK), 0
        flat_M = experts_NK.reshape(-1)
        # Stable sort keeps token order inside each expert's group (first come, first served under capacity).
        expert_sorted_M, order_M = flat_M.sort(stable=True)
        counts_E = torch.zeros(E, dtype=torch.int64, device=flat_M.device).scatter_add_(
            0, flat_M, torch.ones_like(flat_M)
        )
        n_dropped = 0
        if capacity is not None:
            start_E = counts_E.cumsum(0) - counts_E
            rank_M = torch.arange(flat_M.numel(), device=flat_M.device) - start_E[expert_sorted_M]
            keep_M = rank_M < capacity
            order_M = order_M[keep_M]
            n_dropped = flat_M.numel() - order_M.numel()
            counts_E = counts_E.clamp(max=capacity)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        token_M = order_M // K
        x_MD = x_ND[token_M]
        gate, up = _grouped_mm(x_MD, self.w13.transpose(-2, -1), offs_E, counts_E).chunk(2, dim=-1)
        y_MD = _grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs_E, counts_E)
        y_MD = y_MD * weights_NK.reshape(-1)[order_M, None].to(y_MD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_M, y_MD), n_dropped

    def forward_few(self, x_ND, weights_NK, experts_NK):
        """The same sums for a handful of tokens (decode): one matrix-vector product per chosen expert.

        Sorting, counting and scattering cost more than the products themselves at batch 1, and
        grouped_mm visits every expert, chosen or not. Here the choices come to the host (one sync,
        as any sampler makes anyway) and each chosen expert multiplies just its own tokens.
        """
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
            gate, up = linear(x_ND[rows], self.w13[e]).chunk(2, dim=-1)
            y_ND[rows] += linear(F.silu(gate) * up, self.w2[e]) * w_M1
        return y_ND

    def forward_gathered(self, x_ND, weights_NK, experts_NK):
        """The same sums with no host sync and no data-dependent shape, for a compiled decode step.

        Each token's k-th expert is gathered (w13[e] for every row) and multiplied as one reduction.
        torch.compile fuses the gather into the product, so only the chosen experts' weights are read
        (gpt-fast's decode trick). Eager, the gather would copy them first: compiled use only.
        """
        return gathered_experts(x_ND, weights_NK, experts_NK, lambda x, name, e_N: mv(x, getattr(self, name)[e_N]))


def gathered_experts(x_ND, weights_NK, experts_NK, product):
    """Σ_k weight_k · expert_k(x) with each row's k-th expert indexed by a tensor (no host sync).

    product(x, "w13" or "w2", e_N) multiplies row n of x by expert e_N[n]'s weight; QuantExperts
    passes its dequantising product, Experts a plain one.
    """
    y_ND = torch.zeros_like(x_ND)
    for k in range(experts_NK.shape[1]):
        e_N = experts_NK[:, k]
        gate, up = product(x_ND, "w13", e_N).chunk(2, dim=-1)  # [N, 2F]
        y_ND = y_ND + product(F.silu(gate) * up, "w2", e_N) * weights_NK[:, k, None].to(x_ND.dtype)
    return y_ND


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.routing: Routing | None = None  # set by every forward; read by losses and analysis

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        x_ND = x_BSD.reshape(-1, D)
        logits_NE, weights_NK, experts_NK = self.router(x_ND)
        cap = None
        if self.training and self.cfg.capacity_factor is not None:
            cap = math.ceil(self.cfg.capacity_factor * x_ND.shape[0] * self.cfg.top_k / self.cfg.n_experts)
        y_ND, n_dropped = self.experts(x_ND, weights_NK, experts_NK, capacity=cap)
        self.routing = Routing(logits_NE, weights_NK, experts_NK, n_dropped)
        return y_ND.view(B, S, D)


# ---- grouped matmul -------------------------------------------------------------------------------
_GROUPED_MM_OK: dict[tuple, bool] = {}


@torch.compiler.disable  # its meta kernel wants bf16 (CUDA) inputs: run it eagerly inside compiled code
def _grouped_mm(x_MI, w_EIO, offs_E, counts_E):
    """x rows grouped by expert (group e ends at offs[e]) times w[e]: [M, I] x [E, I, O] -> [M, O].

    torch.nn.functional.grouped_mm does it in one call (CPU kernel since torch 2.9; CUDA needs sm80+).
    Where it is missing or refuses the dtype/device, fall back to one matmul per expert.
    """
    key = (x_MI.device.type, x_MI.dtype)
    # grouped_mm wants 16-byte-aligned row strides (forward and backward); that depends on the shape,
    # not on (device, dtype), so check it here rather than letting the cache turn it into an error.
    aligned = all(n * x_MI.element_size() % 16 == 0 for n in (x_MI.shape[-1], w_EIO.shape[-1]))
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


# ---- router losses (pure functions of the routing of all layers) ----------------------------------
def load_balancing_loss(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eqs. 4-6), computed as transformers does.

    E * Σ_e f_e * P_e, with f_e the fraction of top-k assignments to expert e and P_e its mean router
    probability, both taken over the tokens of all layers together. 1.0 when perfectly balanced
    (for top-1; K for top-k, since f sums to K).
    """
    logits_LNE = torch.stack([lg.float() for lg in logits])
    E = logits_LNE.shape[-1]
    probs = logits_LNE.softmax(dim=-1).reshape(-1, E)
    chosen = probs.topk(top_k, dim=-1).indices
    frac_E = F.one_hot(chosen, E).float().sum(dim=1).mean(dim=0)  # fraction of tokens sent to each expert
    return E * (frac_E * probs.mean(dim=0)).sum()


def router_z_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean squared log-sum-exp of the logits, over layers."""
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).square().mean() for lg in logits]).mean()
