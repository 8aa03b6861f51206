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

`upcycle_dir` streams: it reads the dense directory one layer at a time and writes the MoE's shards as
it goes, so it holds one layer's experts, never the model (`upcycle` works on a model in memory; the
two give the same tensors, bit for bit, for the same seed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from .build import build_model, skeleton
from .checkpoint import has_tokenizer
from .config import ModelConfig
from .convert import hf_layout, to_hf
from .errors import TinyMixtralError
from .model.moe import FeedForward
from .streaming import ModelWriter, open_weights

ROUTER_INITS = ("random", "zero")


@torch.no_grad()
def upcycle(dense_model, n_experts: int, top_k: int, noise: float = 0.0, router: str = "random", seed: int = 0):
    """A Mixtral Transformer with n_experts copies of each dense FFN (plus optional relative noise)."""
    cfg = dense_model.cfg
    _check(cfg, n_experts, top_k, noise, router)
    moe_cfg = cfg.replace(n_experts=n_experts, top_k=top_k)
    p0 = next(dense_model.parameters())
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v for k, v in dense_model.state_dict().items() if ".ffn." not in k}
    for i, layer in enumerate(dense_model.layers):
        assert isinstance(layer.ffn, FeedForward), "a dense model has a FeedForward in every layer"
        w13, w2 = layer.ffn.w13.weight.detach().cpu(), layer.ffn.w2.weight.detach().cpu()
        sd.update(_moe_layer(i, w13, w2, moe_cfg, noise, router, gen, p0.dtype))
    return build_model(moe_cfg, {k: v.cpu() for k, v in sd.items()}, device=p0.device).eval()


@torch.no_grad()
def upcycle_dir(src: str | Path, out: str | Path, n_experts: int, top_k: int, noise: float = 0.0,
                router: str = "random", seed: int = 0, max_shard_bytes: int = 5 * 2**30) -> ModelConfig:
    """`upcycle` from a dense model directory (HF or Mistral-native) to a HF Mixtral directory, layer by layer.

    Tensors keep their stored dtype; the router takes the embedding's. Holds one layer's experts at a time.
    Returns the MoE's config.
    """
    cfg, files = open_weights(src)
    _check(cfg, n_experts, top_k, noise, router)
    moe_cfg = cfg.replace(n_experts=n_experts, top_k=top_k)
    layout = hf_layout({k: f.shape(k) for k, f in files.items()}, cfg)  # refuses missing or misshapen weights
    stored = {native: files[parts[0][0]].dtype(parts[0][0]) for native, parts in layout.items()}
    dtype = stored["embed.weight"]  # the router's: the dense model's first parameter, as `upcycle` takes it
    plan = {}
    for native, t in skeleton(moe_cfg).state_dict().items():
        dense = native.replace("ffn.experts.w13", "ffn.w13.weight").replace("ffn.experts.w2", "ffn.w2.weight")
        for key, part in to_hf({native: t}, moe_cfg).items():
            plan[key] = (files[key].dtype(key) if key in files else stored.get(dense, dtype), tuple(part.shape))
    gen = torch.Generator().manual_seed(seed)
    tokenizer = src if has_tokenizer(src) else None
    with ModelWriter(out, moe_cfg, plan, tokenizer, max_shard_bytes) as w:
        layers = {}
        for key in tqdm(plan, desc=f"upcycling {Path(src).name}", unit="tensor", disable=None, leave=False):
            i = _hf_layer(key)
            if ".block_sparse_moe." in key:
                if i not in layers:  # the whole layer's experts and router at once, drawn in `upcycle`'s order
                    w13, w2 = (_read(files, layout[f"layers.{i}.ffn.{n}.weight"]) for n in ("w13", "w2"))
                    layers = {i: to_hf(_moe_layer(i, w13, w2, moe_cfg, noise, router, gen, dtype), moe_cfg)}
                w.write(key, layers[i].pop(key))
            else:
                w.write(key, files[key].read(key))
    return moe_cfg


def _check(cfg: ModelConfig, n_experts, top_k, noise, router):
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


def _moe_layer(i: int, w13, w2, moe_cfg: ModelConfig, noise: float, router: str, gen, dtype) -> dict:
    """Layer i's MoE tensors (native keys) from its dense FFN; draws noise then router from `gen`, in that order."""
    E, D = moe_cfg.n_experts, moe_cfg.d_model
    out = {f"layers.{i}.ffn.experts.w13": _copies(w13, E, noise, gen),
           f"layers.{i}.ffn.experts.w2": _copies(w2, E, noise, gen)}
    gate = torch.zeros(E, D, dtype=torch.float32)
    if router == "random":
        gate.normal_(0.0, moe_cfg.init_std, generator=gen)
    out[f"layers.{i}.ffn.router.weight"] = gate.to(dtype)
    if moe_cfg.noisy_gating:  # ours only; carried over from the dense config
        out[f"layers.{i}.ffn.router.noise.weight"] = torch.zeros(E, D, dtype=dtype)
    return out


def _read(files: dict, parts: list) -> torch.Tensor:
    """A native tensor from its HF parts (fused w1/w3 in the first part's dtype, as load_model builds it)."""
    first = parts[0][0]
    rows = sum(files[k].shape(k)[0] for k, _ in parts)
    out = torch.empty((rows, *files[first].shape(first)[1:]), dtype=files[first].dtype(first))
    for key, index in parts:
        files[key].read_into(key, out[index] if index else out)
    return out


def _hf_layer(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[2]) if key.startswith("model.layers.") else None


def _copies(w: torch.Tensor, n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """[n, *w.shape]: n copies of w, each plus N(0, (noise * std(w))^2) noise (drawn in fp32)."""
    if noise == 0:
        return w.unsqueeze(0).repeat(n, *([1] * w.dim()))  # no fp32 copy of a bf16 layer
    out = w.float().unsqueeze(0).repeat(n, *([1] * w.dim()))
    out += torch.randn(out.shape, generator=gen).mul_(noise * w.float().std())  # in place: one draw's copy
    return out.to(w.dtype).contiguous()
