"""Grouped-query causal self-attention with rotary embeddings and an optional sliding window.

Shapes: B batch, S sequence, D model dim, H query heads, G key/value heads, C head dim.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import gemv
from .fast import Linear
from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v in one matmul; the converter splits/joins HF's q_proj, k_proj, v_proj.
        self.wqkv = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)

    def forward(self, x_BSD, cos, sin, mask=None, kv=None):
        """mask: None for plain causal attention, else bool (True = may attend), [S, S] or [B, 1, S, keys].

        kv: None, or (KVCache, layer index) when decoding; the cache has planned this step (KVCache.plan).
        """
        B, S, _ = x_BSD.shape
        H, G, C = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x_BSD).split((H * C, G * C, G * C), dim=-1)
        q_BHSC = q.view(B, S, H, C).transpose(1, 2)
        k_BGSC = k.view(B, S, G, C).transpose(1, 2)
        v_BGSC = v.view(B, S, G, C).transpose(1, 2)
        q_BHSC, k_BGSC = apply_rope(q_BHSC, cos, sin), apply_rope(k_BGSC, cos, sin)
        if kv is not None:
            cache, layer = kv
            k_BGSC, v_BGSC = cache.attend_keys(layer, k_BGSC, v_BGSC)
            if S == 1 and mask is not None and gemv.attention_applies(q_BHSC, k_BGSC):  # a decode step: one call
                y_BHC = gemv.attention(q_BHSC.view(B, H, C), k_BGSC, v_BGSC, mask.view(B, -1), C ** -0.5)
                return self.wo(y_BHC.view(B, 1, H * C))
        y_BHSC = F.scaled_dot_product_attention(
            q_BHSC, k_BGSC, v_BGSC, attn_mask=mask, is_causal=mask is None, enable_gqa=G != H
        )
        return self.wo(y_BHSC.transpose(1, 2).reshape(B, S, H * C))


def attention_mask(qpos_BS: torch.Tensor, kpos_BK: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, S, K] bool from query and key positions: causal, within the window, never an empty key."""
    q, k = qpos_BS[:, :, None], kpos_BK[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    allowed |= (q < 0)  # padding queries: anything (their output is ignored), never an all-masked row
    return allowed[:, None]


def sliding_window_mask(S: int, window: int, device=None) -> torch.Tensor:
    """[S, S] bool: query i sees key j when i - window < j <= i (window tokens, itself included)."""
    pos_1S = torch.arange(S, device=device)[None]
    return attention_mask(pos_1S, pos_1S, window)[0, 0]
