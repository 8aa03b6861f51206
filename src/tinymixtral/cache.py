"""The KV cache: preallocated keys and values of every layer, written at time-step slots.

Shapes: L layers, B batch, G key/value heads, T slots, C head dim, S new tokens.

With a sliding window W the cache is a rolling buffer of T = W slots: time step t lives in slot t mod W,
so its memory stays the same however long generation runs (Mistral's rolling buffer). Without a
window it is a static cache of T = prompt + new tokens. Nothing is ever shifted or re-fed.

Slots are indexed by time step, not by position, so a batch of prompts of different lengths can be
left-padded and still share one slot index per step: each row's own positions are kept in `pos`
(-1 marks an empty slot or a padding token, which no query may attend to).

`StaticStep` is the same cache seen by one decode step through tensors only, for torch.compile.
"""

from __future__ import annotations

import torch
from torch import nn

from .model.attention import attention_mask


class KVCache(nn.Module):
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, slots: int, head_dim: int,
                 window: int | None, dtype=torch.float32, device=None):
        super().__init__()
        self.window, self.t = window, 0  # t: time steps written so far
        self._write_first, self._slots, self._n_keys, self._qpos = True, None, 0, None  # set by plan()
        shape = (n_layers, batch, n_kv_heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.full((batch, slots), -1, dtype=torch.long, device=device),
                             persistent=False)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> KVCache:
        """A cache for `model`: W slots for a windowed model, else max_len slots."""
        cfg = model.cfg
        slots = min(cfg.sliding_window, max_len) if cfg.sliding_window else max_len
        p = model.embed.weight
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim, cfg.sliding_window, p.dtype, p.device)

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    def __setattr__(self, name, value):
        if name == "t":  # a plain int, set at every decode step: nn.Module's checks cost ~8 us a set
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def reset(self):
        self.t = 0
        self.pos.fill_(-1)

    def plan(self, qpos_BS: torch.Tensor) -> torch.Tensor:
        """Decide how the S new tokens at time steps t..t+S-1 are attended; return the mask [B, 1, S, keys].

        If the new tokens land in slots that hold nothing a query still needs (no wrap, or S = 1),
        they are written first and attention reads the cache alone. Otherwise (a prefill chunk that
        wraps the rolling buffer) attention reads [old cache ; new tokens] and the write comes after.
        The decision and the slots are kept for attend_keys(), which every layer calls.
        """
        S, T = qpos_BS.shape[1], self.slots
        if S > T:
            raise ValueError(f"a chunk of {S} tokens does not fit a cache of {T} slots; prefill in chunks")
        self._check_room(S)
        self._write_first = self.t + S <= T or S == 1
        # contiguous slots are a slice (a view write); wrapped ones need an index tensor
        self._slots = (slice(self.t, self.t + S) if self.t + S <= T
                       else torch.arange(self.t, self.t + S, device=qpos_BS.device) % T)
        if self._write_first:
            self.pos[:, self._slots] = qpos_BS
            self._n_keys = min(self.t + S, T)
            kpos_BK = self.pos[:, :self._n_keys]
        else:
            kpos_BK = torch.cat([self.pos, qpos_BS], dim=1)
        self._qpos = qpos_BS
        return attention_mask(qpos_BS, kpos_BK, self.window)

    def attend_keys(self, layer: int, k_BGSC, v_BGSC):
        """Store the new keys/values of one layer and return the keys/values to attend over."""
        if self._write_first:
            self.k[layer, :, :, self._slots] = k_BGSC
            self.v[layer, :, :, self._slots] = v_BGSC
            return self.k[layer, :, :, :self._n_keys], self.v[layer, :, :, :self._n_keys]
        keys = torch.cat([self.k[layer], k_BGSC], dim=2)
        values = torch.cat([self.v[layer], v_BGSC], dim=2)
        self.k[layer, :, :, self._slots] = k_BGSC
        self.v[layer, :, :, self._slots] = v_BGSC
        return keys, values

    def advance(self, S: int):
        """Close a forward pass of S tokens: commit positions written after attention, move t on."""
        if not self._write_first:
            self.pos[:, self._slots] = self._qpos
        self.t += S

    def _check_room(self, S: int):
        """A static cache (no window, or fewer slots than the window) must not wrap over keys still needed."""
        T = self.slots
        if (self.window is None or T < self.window) and self.t + S > T:
            raise ValueError(f"the cache holds {T} time steps and is full; make it for a longer max_len")

    def static_step(self) -> tuple[torch.Tensor, ...]:
        """The tensors a compiled decode step works on: k, v, pos and the slot of the next time step."""
        self._check_room(1)
        return self.k, self.v, self.pos, torch.tensor([self.t % self.slots], device=self.pos.device)


class StaticStep:
    """A KVCache as one decode step (one new token per row) sees it, with tensor indices only.

    The slot to write is a tensor (t mod T), not a Python slice, and attention reads all T slots,
    empty ones masked by pos = -1. So every step has the same shapes and no Python number that
    changes, and one compiled graph serves the whole generation (gpt-fast's static cache). The
    caller moves KVCache.t on. Results equal KVCache.plan / attend_keys for S = 1.
    """

    def __init__(self, k, v, pos, slot_1, window: int | None):
        self.k, self.v, self.pos, self.slot, self.window = k, v, pos, slot_1, window

    def plan(self, qpos_B1: torch.Tensor) -> torch.Tensor:
        self.pos.index_copy_(1, self.slot, qpos_B1)
        return attention_mask(qpos_B1, self.pos, self.window)

    def attend_keys(self, layer: int, k_BG1C, v_BG1C):
        # written into the whole cache tensor by tensor indices, not through a view of one layer: compiled, a
        # write through a view became copies of the layer's cache at every layer and step (1.34 s a step at 1 GB)
        layer_1 = torch.full_like(self.slot, layer)
        self.k[layer_1, :, :, self.slot] = k_BG1C.permute(2, 0, 1, 3)  # [1, B, G, C]: the indexed dims first
        self.v[layer_1, :, :, self.slot] = v_BG1C.permute(2, 0, 1, 3)
        return self.k[layer], self.v[layer]

    def advance(self, S: int):
        pass
