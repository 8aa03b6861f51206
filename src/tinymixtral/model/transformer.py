"""The decoder: embedding -> N pre-norm blocks (attention, then MoE or dense FFN) -> RMSNorm -> LM head.

Shapes: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import Attention, sliding_window_mask
from .fast import Linear, dropout, linear
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
        self.dropout = 0.0  # training only, on each branch's output (Transformer.set_dropout)

    def forward(self, x_BSD, cos, sin, mask, kv=None):
        h_BSD = x_BSD + self._drop(self.attn(self.attn_norm(x_BSD), cos, sin, mask, kv))
        return h_BSD + self._drop(self.ffn(self.ffn_norm(h_BSD)))

    def _drop(self, y):
        return dropout(y, self.dropout) if self.training and self.dropout else y


class TiedHead(nn.Module):
    """The LM head of a model whose head is its embedding (tie_embeddings): W = embed.weight, read at each
    call, so loading new weights into the embedding (load_state_dict(assign=True)) leaves nothing to re-tie."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self._embed = [embed]  # in a list: not registered a second time (one parameter, one state-dict key)

    @property
    def weight(self) -> torch.Tensor:
        return self._embed[0].weight

    def forward(self, x):
        return linear(x, self.weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = TiedHead(self.embed) if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size)
        self.dropout = 0.0
        self.reset_parameters()

    def set_dropout(self, p: float, ffn: float = 0.0) -> None:
        """Dropout with probability p, in training mode only, on the embeddings and on each block's attention
        and FFN outputs (GPT-2's residual dropout); with probability ffn on each FFN's hidden layer (each expert's
        in an MoE). A training option: it adds no weight and leaves the checkpoint a plain Mixtral, and eval
        mode (evaluation, generation) never drops."""
        self.dropout = p
        for layer in self.layers:
            layer.dropout = p
            (layer.ffn.experts if isinstance(layer.ffn, MoE) else layer.ffn).dropout = ffn

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, init_std) for every matrix, ones for norms: transformers' initialisation."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.cfg.init_std)

    def forward(self, input_ids_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, cache=None,
                positions_BS=None, last_only: bool = False):
        """Logits [B, S, V] (or [B, 1, V] with last_only) for token ids [B, S] at positions 0, 1, ...

        With targets_BS (next-token ids [B, S]): (loss, parts) instead, where loss is what training
        minimises, the cross-entropy plus the router losses the config switches on, and parts names each
        term ("loss" is the cross-entropy). With a KVCache: the tokens continue the cached ones;
        positions_BS gives each row's positions (negative = padding), default cache.t + i.
        """
        B, S = input_ids_BS.shape
        x_BSD = self.embed(input_ids_BS)
        if self.training and self.dropout:
            x_BSD = dropout(x_BSD, self.dropout)
        window = self.cfg.sliding_window
        if cache is None:
            positions = torch.arange(S, device=input_ids_BS.device)
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
        logits_BSV = self.lm_head(self.norm(x_BSD))
        if targets_BS is None:
            return logits_BSV
        ce = F.cross_entropy(logits_BSV.float().view(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
        parts = {"loss": ce, **self.router_losses()}
        return sum(parts.values()), parts

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
