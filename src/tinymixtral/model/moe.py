"""Sparse mixture of SwiGLU experts (Mixtral), the dense SwiGLU FFN (Mistral), and router losses.

Shapes: N tokens (B*S flattened), D model dim, F expert hidden dim, E experts, K experts per token,
M = N*K token-expert assignments.

Routing is Mixtral's: softmax over all E router logits, keep the top K, renormalise them to sum to 1.
That equals a softmax over the K largest logits alone (the common factor cancels); we use the first
form because it is transformers' and so picks the same experts on ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, capacity
from . import fast, gemv
from .fast import Linear
from .rows import combine, gather_rows, pad_groups


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul (gate rows first)."""

    dropout = 0.0  # training only, on the hidden layer (Transformer.set_dropout), as Experts'

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w13 = Linear(d_model, 2 * d_ff)
        self.w2 = Linear(d_ff, d_model)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(hidden_dropout(F.silu(gate) * up, self))


def hidden_dropout(h, ffn: nn.Module):
    """Dropout on an FFN's hidden layer, in training only: Switch Transformer's expert dropout, and the same for a
    dense FFN, so that an MoE and its dense twin can be regularised alike."""
    return fast.dropout(h, ffn.dropout) if ffn.training and ffn.dropout else h


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
        if (not self.training and x_ND.shape[0] <= fast.FEW_ROWS and gemv.applies(x_ND, self.weight)
                and x_ND.stride(-1) == 1):
            return gemv.route(x_ND, self.weight, self.top_k)  # decode: the lines below in one call
        # In the model's dtype, then fp32 (transformers does the same): a bf16 model must pick the experts
        # transformers picks, and an fp32 product would break their near ties differently.
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
    load without reshaping. The forward is torchtitan's: dispatch (sort the token-expert assignments by
    expert) -> one grouped product per weight -> combine (weight each row, add it back to its token).
    `grouped_mm` and `expert_mm` are the seam where the products happen: QuantExperts overrides them.
    """

    dropout = 0.0  # training only, on each expert's hidden layer (Transformer.set_dropout); subclasses too

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.w13 = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_ff, cfg.d_model))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ff))

    def forward(self, x_ND, weights_NK, experts_NK, capacity: int | None = None):
        """(Σ_k weight_k · expert_k(x) [N, D], assignments dropped over capacity)."""
        (N, K), out_dtype = experts_NK.shape, x_ND.dtype
        ours = gemv.applies(x_ND, self.w13) and self.w2.is_contiguous()
        few_tokens = None if self.training and self.dropout else fast.experts_path(  # only the chosen experts
            N, K, self.n_experts, capacity, ours or self.gathers(x_ND))
        if few_tokens is not None:  # ours: one op, both products
            return (gemv.experts(x_ND, self.w13, self.w2, experts_NK, weights_NK) if ours
                    else few_tokens(self, x_ND, weights_NK, experts_NK)), 0
        order_M, counts_E, n_dropped = dispatch(experts_NK, self.n_experts, capacity)
        dev = x_ND.device.type
        if torch.is_autocast_enabled(dev):  # autocast skips grouped_mm: move in its dtype, as a linear would
            x_ND = x_ND.to(torch.get_autocast_dtype(dev))
        if capacity is not None:  # some assignments dropped: gather the kept ones, add them back by index
            token_M = order_M // K
            y_MD = self.experts_mlp(x_ND[token_M], counts_E)
            y_MD = y_MD * weights_NK.reshape(-1)[order_M, None].to(y_MD.dtype)
            return torch.zeros_like(x_ND).index_add_(0, token_M, y_MD).to(out_dtype), n_dropped
        # Every assignment kept: to the experts and back by gathers, forward and backward (rows.py), each expert's
        # group padded (fast.group_rows); back weighted and summed over k in one op (padding rows get no gradient).
        slot_M, src_P, counts_E = pad_groups(order_M, counts_E, fast.group_rows(x_ND), torch.compiler.is_compiling())
        x_PD = gather_rows(x_ND, (src_P // K).clamp_(max=N - 1), slot_M, K)  # padding rows: any row (discarded)
        y_PD = self.experts_mlp(x_PD, counts_E)
        y_ND = combine(y_PD, slot_M.view(N, K), weights_NK, src_P)
        return y_ND.to(out_dtype), 0

    def experts_mlp(self, x_MD, counts_E):
        """Each row through its expert's SwiGLU; rows grouped by expert, counts_E[e] rows for expert e."""
        gate, up = self.grouped_mm(x_MD, "w13", counts_E).chunk(2, dim=-1)
        return self.grouped_mm(hidden_dropout(F.silu(gate) * up, self), "w2", counts_E)

    def grouped_mm(self, x_MI, name: str, counts_E):
        """Rows grouped by expert (counts_E[e] rows for expert e, in order) times each one's weight `name`."""
        offs_E = counts_E.cumsum(0).to(torch.int32)
        return fast.grouped_mm(x_MI, getattr(self, name).to(x_MI.dtype).transpose(-2, -1), offs_E, counts_E)

    def gathers(self, x_ND) -> bool:
        """Whether expert_mm with a tensor of experts runs eagerly without copying the chosen weights (QuantExperts
        on our kernels). Here it would gather them: only compiled code, which fuses the gather, takes it."""
        return False

    def expert_mm(self, x, name: str, e):
        """x times expert e's weight `name`; e an int, or (compiled) a tensor of one expert per row of x."""
        w = getattr(self, name)
        return fast.linear(x, w[e]) if isinstance(e, int) else fast.mv(x, w[e])


def dispatch(experts_NK, n_experts: int, capacity: int | None = None):
    """Token-expert assignments sorted by expert: (order_M, counts_E, n_dropped).

    order_M lists assignment indices (n * K + k) grouped by expert; with a capacity each expert keeps its
    first `capacity` assignments in token order (the stable sort: first come, first served).
    """
    flat_M = experts_NK.reshape(-1)
    expert_sorted_M, order_M = flat_M.sort(stable=True)
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=flat_M.device).scatter_add_(
        0, flat_M, torch.ones_like(flat_M)
    )
    if capacity is None:
        return order_M, counts_E, 0
    start_E = counts_E.cumsum(0) - counts_E
    rank_M = torch.arange(flat_M.numel(), device=flat_M.device) - start_E[expert_sorted_M]
    order_M = order_M[rank_M < capacity]
    return order_M, counts_E.clamp(max=capacity), flat_M.numel() - order_M.numel()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        # set by every forward but a compiled one at inference (a decode step: 3 more outputs a layer and their
        # Python replay, for nothing); read by losses and analysis
        self.routing: Routing | None = None

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        x_ND = x_BSD.reshape(-1, D)
        logits_NE, weights_NK, experts_NK = self.router(x_ND)
        cap = capacity(x_ND.shape[0], self.cfg) if self.training and self.cfg.capacity_factor is not None else None
        y_ND, n_dropped = self.experts(x_ND, weights_NK, experts_NK, capacity=cap)
        if self.training or not torch.compiler.is_compiling():
            self.routing = Routing(logits_NE, weights_NK, experts_NK, n_dropped)
        return y_ND.view(B, S, D)


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
