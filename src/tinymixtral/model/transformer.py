"""The decoder: embedding -> N pre-norm blocks (attention, then MoE or dense FFN) -> RMSNorm -> LM head.

Shapes: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, sliding_window_mask
from .linear import Linear
from .moe import FeedForward, MoE, Routing, load_balancing_loss, router_z_loss
from .norm import RMSNorm
from .rope import rope_cos_sin


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe else FeedForward(cfg.d_model, cfg.d_ff)

    def forward(self, x_BSD, cos, sin, mask, kv=None):
        h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, mask, kv)
        return h_BSD + self.ffn(self.ffn_norm(h_BSD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, init_std) for every matrix, ones for norms: transformers' initialisation."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.cfg.init_std)

    def forward(self, input_ids_BS: torch.Tensor, start_pos: int = 0, cache=None, positions_BS=None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (or [B, 1, V] with last_only) for token ids [B, S].

        Without a cache: positions start_pos, start_pos+1, ... With a KVCache: the tokens continue the
        cached ones; positions_BS gives each row's positions (negative = padding), default cache.t + i.
        """
        B, S = input_ids_BS.shape
        x_BSD = self.embed(input_ids_BS)
        window = self.cfg.sliding_window
        if cache is None:
            positions = torch.arange(start_pos, start_pos + S, device=input_ids_BS.device)
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x_BSD.dtype)
            mask = None if window is None or S <= window else sliding_window_mask(S, window, x_BSD.device)
            for layer in self.layers:
                x_BSD = layer(x_BSD, cos, sin, mask)
        else:
            if positions_BS is None:
                positions_BS = torch.arange(cache.t, cache.t + S, device=input_ids_BS.device).expand(B, S)
            cos, sin = rope_cos_sin(positions_BS.clamp(min=0), self.cfg.head_dim, self.cfg.rope_theta, x_BSD.dtype)
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, C]: one rotation per row and position
            mask = cache.plan(positions_BS)
            for i, layer in enumerate(self.layers):
                x_BSD = layer(x_BSD, cos, sin, mask, (cache, i))
            cache.advance(S)
        if last_only:
            x_BSD = x_BSD[:, -1:]  # the head over 32000 tokens is costly: only where we sample
        return self.lm_head(self.norm(x_BSD))

    # ---- routing of the last forward pass --------------------------------------------------------
    def routing(self) -> list[Routing]:
        """Per layer, what the router chose in the last forward pass (empty for a dense model)."""
        return [layer.ffn.routing for layer in self.layers if isinstance(layer.ffn, MoE) and layer.ffn.routing]

    def router_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, already weighted by their config coefficients."""
        routing = self.routing()
        if not routing:
            return {}
        logits = [r.logits_NE for r in routing]
        out = {}
        if self.cfg.router_aux_loss_coef > 0:
            out["aux_loss"] = self.cfg.router_aux_loss_coef * load_balancing_loss(logits, self.cfg.top_k)
        if self.cfg.router_z_loss_coef > 0:
            out["z_loss"] = self.cfg.router_z_loss_coef * router_z_loss(logits)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once
