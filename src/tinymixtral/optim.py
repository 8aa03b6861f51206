"""Optimizers of a run: which parameters train (--train-only), and AdamW or Muon (hidden matrices) + AdamW.

Muon (Jordan et al., 2024; `torch.optim.Muon` since torch 2.9) replaces each hidden weight matrix's
momentum update by its nearest semi-orthogonal matrix, found by a few Newton-Schulz iterations:

    B <- mu B + (1 - mu) G;  U = G + mu (B - G) (Nesterov);  O = NS(U) ~ U (U^T U)^(-1/2)
    W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) O

torch's Muon takes 2-D parameters only. Ours applies the same update to every matrix of a parameter:
an expert stack [E, 2F, D] is E matrices (orthogonalised per expert, in one batched iteration), and a
fused weight is cut into the matrices it fuses (q, k, v of `wqkv`; w1, w3 of `w13`), so each is
updated as it would be unfused. Embeddings, the head, norms and the router stay with AdamW (Muon is
for hidden matrices; the router's few rows choose experts and are better left to Adam).
"""

from __future__ import annotations

import math

import torch

from .errors import TinyMixtralError
from .params import fast_bf16

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (and Keller Jordan's) quintic


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16):
    """An approximately semi-orthogonal matrix with G's singular vectors, for each matrix of G [..., m, n].
    The same products as torch.optim.Muon's (addmm there, its batched form here)."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return (X.mT if tall else X).reshape(G.shape).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups with use_muon=True (parameters [..., m, n], every trailing matrix on its own; a
    parameter may carry `muon_splits`, the sizes along dim -2 of the matrices fused in it), AdamW for the
    others, in one optimizer (as Keller Jordan's MuonWithAuxAdam): one object to clip, scale, save and
    shard. AdamW here is torch.optim.AdamW's update (tested against it)."""

    def __init__(self, param_groups: list[dict], momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: str = "bfloat16", betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        defaults = dict(use_muon=False, weight_decay=0.0, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, betas=betas, eps=eps)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            for p in group["params"] if group["use_muon"] else []:
                if p.dim() < 2:
                    raise ValueError(f"Muon updates matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - lr * wd)  # decoupled weight decay, both kinds
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p, group):
        mu, state = group["momentum"], self.state[p]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        for u, w in zip(update.split(getattr(p, "muon_splits", None) or [p.shape[-2]], dim=-2),
                        p.split(getattr(p, "muon_splits", None) or [p.shape[-2]], dim=-2)):
            o = newton_schulz(u, group["ns_steps"], dtype=getattr(torch, group["ns_dtype"]))
            w.add_(o, alpha=-group["lr"] * math.sqrt(max(1.0, u.shape[-2] / u.shape[-1])))

    def _adamw(self, p, group):
        (b1, b2), state = group["betas"], self.state[p]
        if "exp_avg" not in state:
            state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))


MATRICES = ("wqkv", "wo", "w13", "w2")  # the hidden matrices: attention projections, experts, dense FFN


def split_params(model: torch.nn.Module) -> tuple[list, list]:
    """(hidden matrices, everything else) as (name, parameter) pairs; fused matrices get `muon_splits`."""
    cfg = model.cfg
    hidden, rest = [], []
    for name, p in model.named_parameters():
        *_, owner, leaf = ["", *name.split(".")]
        kind = leaf if leaf in MATRICES else owner if leaf == "weight" and owner in MATRICES else None
        if kind is None or p.dim() < 2:
            rest.append((name, p))
            continue
        if kind == "wqkv":
            p.muon_splits = [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2
        elif kind == "w13":
            p.muon_splits = [p.shape[-2] // 2] * 2
        hidden.append((name, p))
    return hidden, rest


def make_optimizer(raw: torch.nn.Module, tcfg, device: str) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only, not embeddings, norms or biases), or Muon for the hidden
    matrices with AdamW for the rest (the loop sets each group's lr: the schedule times --lr or --muon-lr)."""
    # Frozen parameters (--train-only) are not given to the optimizer: no moments, no weight decay.
    if tcfg.optimizer == "muon":
        hidden, rest = ([(n, p) for n, p in part if p.requires_grad] for part in split_params(raw))
        if not tcfg.muon_experts:  # Newton-Schulz costs per stored expert matrix, not per active one
            rest += [(n, p) for n, p in hidden if ".experts." in n]
            hidden = [(n, p) for n, p in hidden if ".experts." not in n]
        rest, router = _router_apart(rest, tcfg)
        decay = [p for n, p in rest if p.dim() >= 2 and not n.startswith("embed.")]
        no_decay = [p for n, p in rest if p.dim() < 2 or n.startswith("embed.")]
        groups = [{"params": [p for _, p in hidden], "use_muon": True, "lr": tcfg.muon_lr,
                   "weight_decay": tcfg.weight_decay},
                  {"params": decay, "lr": tcfg.lr, "weight_decay": tcfg.weight_decay},
                  {"params": no_decay, "lr": tcfg.lr, "weight_decay": 0.0}, *router]
        # Newton-Schulz in bf16 (as torch's Muon) where bf16 products are native; fp32 elsewhere, where they are
        # slower (a CPU without AVX512-BF16 or AMX)
        return Muon([g for g in groups if g["params"]], betas=(tcfg.beta1, tcfg.beta2),
                    ns_dtype="bfloat16" if fast_bf16(device) else "float32")
    trained, router = _router_apart([(n, p) for n, p in raw.named_parameters() if p.requires_grad], tcfg)
    decay = [p for n, p in trained if p.dim() >= 2 and not n.startswith("embed.")]
    no_decay = [p for n, p in trained if p.dim() < 2 or n.startswith("embed.")]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}, *router]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                             fused=torch.device(device).type in ("cpu", "cuda"))


def _router_apart(named: list, tcfg) -> tuple[list, list[dict]]:
    """With --router-lr: the routers' weights in a group of their own (AdamW, weight decay, `router` marked so
    that the schedule scales --router-lr); without it they stay with the other matrices (and the group count,
    which resumes check, stays as before)."""
    if tcfg.router_lr is None:
        return named, []
    router = [p for n, p in named if ".ffn.router." in n]
    if not router:  # a dense model, or the routers frozen
        return named, []
    rest = [(n, p) for n, p in named if ".ffn.router." not in n]
    return rest, [{"params": router, "lr": tcfg.router_lr, "weight_decay": tcfg.weight_decay, "router": True}]


def peak_lr(group: dict, tcfg) -> float:
    """The peak learning rate of an optimizer group: --muon-lr, --router-lr or --lr."""
    if group.get("use_muon"):
        return tcfg.muon_lr
    if group.get("router") and tcfg.router_lr is not None:
        return tcfg.router_lr
    return tcfg.lr


TRAIN_ONLY = {"router": (".ffn.router.",), "experts": (".ffn.experts.", ".ffn.w13.", ".ffn.w2."),
              "attention": (".attn.",)}


def freeze(model, train_only: str) -> None:
    """--train-only: requires_grad stays on the router, the experts (a dense model's FFN) or the attention
    projections alone; every other parameter is frozen. 'all' trains everything."""
    if train_only == "all":
        return
    if train_only not in TRAIN_ONLY:
        raise TinyMixtralError(f"--train-only must be router, experts, attention or all, got {train_only!r}")
    if train_only == "router" and not model.cfg.is_moe:
        raise TinyMixtralError("--train-only router needs an MoE, but this model is dense (no router)")
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in name for part in TRAIN_ONLY[train_only]))
