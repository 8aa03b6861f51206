"""Rotary position embedding (Su et al. 2021) as two pure functions.

Uses the "rotate half" layout of Hugging Face checkpoints: dimension i is paired with i + C/2
(Meta's original checkpoints pair 2i with 2i+1; HF permuted the q/k weights to match this).
"""

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [*positions.shape, head_dim] for integer positions."""
    inv_freq_C2 = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq_C2  # in fp32: positions reach 1e5 and more
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, S, C] by cos/sin [S, C] (or [B, 1, S, C])."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
