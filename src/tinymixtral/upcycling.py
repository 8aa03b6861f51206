"""Upcycling: a dense Mistral-architecture model -> a Mixtral whose experts start as copies of its FFN.

Sparse upcycling (Komatsuzaki et al. 2022): attention, norms, embedding and head are copied as they are;
every expert of a layer is a copy of that layer's dense SwiGLU FFN. With identical experts the MoE output
is Σ_k w_k FFN(x) = FFN(x), because the renormalised top-k weights sum to 1, so the upcycled model computes
the dense model's function whatever its router says, until training makes the experts differ.

--noise STD adds Gaussian noise to each expert copy, *relative* to the tensor it perturbs:
W_e = W + N(0, (STD * std(W))^2), with std(W) the standard deviation of the whole dense tensor (the fused
gate+up projection, or the down projection), an independent draw per expert, so experts can diverge from
the first step. STD = 0.01 perturbs each weight by about 1% of the tensor's spread.
--router random: normal(0, init_std), as a fresh Mixtral router; zero: all logits equal at first (ties are
broken by expert index, so the first K experts are chosen until training moves the router).
"""

from __future__ import annotations

import torch

from .build import build_model
from .errors import TinyMixtralError
from .model.moe import FeedForward

ROUTER_INITS = ("random", "zero")


@torch.no_grad()
def upcycle(dense_model, n_experts: int, top_k: int, noise: float = 0.0, router: str = "random", seed: int = 0):
    """A Mixtral Transformer with n_experts copies of each dense FFN (plus optional relative noise)."""
    cfg = dense_model.cfg
    if cfg.is_moe:
        raise TinyMixtralError("upcycle needs a dense (Mistral-architecture) model, but this one is already an "
                               f"MoE with {cfg.n_experts} experts")
    if not isinstance(n_experts, int) or n_experts < 1:
        raise TinyMixtralError(f"--experts must be a positive integer, got {n_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise TinyMixtralError(f"--top-k must be between 1 and --experts ({n_experts}), got {top_k!r}")
    if router not in ROUTER_INITS:
        raise TinyMixtralError(f"--router must be one of {', '.join(ROUTER_INITS)}, got {router!r}")
    if not noise >= 0:
        raise TinyMixtralError(f"--noise must be >= 0, got {noise}")
    moe_cfg = cfg.replace(n_experts=n_experts, top_k=top_k)
    p0 = next(dense_model.parameters())
    dtype = p0.dtype
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v for k, v in dense_model.state_dict().items() if ".ffn." not in k}
    for i, layer in enumerate(dense_model.layers):
        assert isinstance(layer.ffn, FeedForward), "a dense model has a FeedForward in every layer"
        w13, w2 = layer.ffn.w13.weight.detach().cpu(), layer.ffn.w2.weight.detach().cpu()
        sd[f"layers.{i}.ffn.experts.w13"] = _copies(w13, n_experts, noise, gen)
        sd[f"layers.{i}.ffn.experts.w2"] = _copies(w2, n_experts, noise, gen)
        gate = torch.zeros(n_experts, cfg.d_model, dtype=torch.float32)
        if router == "random":
            gate.normal_(0.0, cfg.init_std, generator=gen)
        sd[f"layers.{i}.ffn.router.weight"] = gate.to(dtype)
        if moe_cfg.noisy_gating:  # ours only; carried over from the dense config
            sd[f"layers.{i}.ffn.router.noise.weight"] = torch.zeros(n_experts, cfg.d_model, dtype=dtype)
    return build_model(moe_cfg, {k: v.cpu() for k, v in sd.items()}, device=p0.device).eval()


def _copies(w: torch.Tensor, n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """[n, *w.shape]: n copies of w, each plus N(0, (noise * std(w))^2) noise (drawn in fp32)."""
    out = w.float().unsqueeze(0).repeat(n, *([1] * w.dim()))
    if noise > 0:
        out += torch.randn(out.shape, generator=gen) * (noise * w.float().std())
    return out.to(w.dtype).contiguous()
