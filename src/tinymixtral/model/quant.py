"""Weight-only int8 / int4 quantized modules: QuantLinear / QuantExperts and the swap (the format: qformat.py).

Schemes, and their quantize / dequantize: qformat.py.

Quantized: attention (wqkv, wo), experts (w13, w2), a dense FFN, and an untied LM head (as gpt-fast does).
Full precision: the router (a quantized router changes which experts are chosen), embeddings, norms, and a
head tied to the embedding.

Runtime (cpu_kernels.py): on CPU, our AVX2 kernels for int8 (int4 too with INT4_OURS; activations quantized to
int8 per block of 32 for up to Q8_ROWS rows, else fp32; past AVX2_ROWS one matmul, bf16 where native), else torch's
(bf16 activations; int4 re-packed into their layout at first use, held only so; `state_dict()` gives the storage
layout), compiled too as one opaque op. Elsewhere, or for shapes a kernel refuses, dequantize then matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TinyMixtralError
from . import cpu_kernels
from .cpu_kernels import (int4_block, kernel_applies, kernel_matmul, kernel_operands, pack_nibbles,  # noqa: F401
                          to_kernel_layout, unpack_kernel_layout, unpack_nibbles, woq_mm)  # (nibbles: re-exported)
from .fast import FEW_ROWS, mv
from .moe import Experts
from .qformat import bf16_ceil, dequantize, quantize, quantize_int4, quantize_int8  # noqa: F401 (re-exported)


# ---- modules -------------------------------------------------------------------------------------
class _Quantized(nn.Module):
    """Shared by QuantLinear and QuantExperts: quantized weights as buffers, and their matmul."""

    compute_dtype: torch.dtype | None | str = "auto"  # None: the activations' own; auto: see _dtype
    use_kernel = True  # False: always dequantize then matmul (the fallback, for tests and comparisons)

    def __init__(self, bits: int, group_size: int | None):
        nn.Module.__init__(self)  # not Experts.__init__ (QuantExperts): the weights are the buffers below
        self.bits, self.group_size = bits, group_size
        self._packed: dict[str, tuple] = {}  # weight name -> the kernel's operands (all experts); not saved
        self._packed_key: dict[str, tuple] = {}  # ... and the weight version they were built from
        self._layout: dict[str, int] = {}  # int4 weight name -> row block, when held in the CPU kernel's layout
        self._as_fp32: set[str] = set()  # fp32 scales / zeros held in bf16 (_compact), given in fp32 by state_dict
        self.register_state_dict_post_hook(_storage_layout)

    def _add(self, name: str, shape: tuple[int, ...], device=None):
        """Empty buffers for one [..., N, K] weight (filled by load_state_dict)."""
        *lead, N, K = shape
        if self.bits == 8:
            self.register_buffer(name, torch.empty(*lead, N, K, dtype=torch.int8, device=device))
            self.register_buffer(self._sfx(name, "scales"), torch.empty(*lead, N, 1, device=device))
        else:
            G = K // self.group_size
            self.register_buffer(name, torch.empty(*lead, N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer(self._sfx(name, "scales"), torch.empty(*lead, N, G, device=device))
            self.register_buffer(self._sfx(name, "zeros"), torch.empty(*lead, N, G, device=device))

    @staticmethod
    def _sfx(name: str, what: str) -> str:
        return what if name == "weight" else f"{name}_{what}"

    def _parts(self, name: str, e: int | None = None):
        parts = [getattr(self, name), getattr(self, self._sfx(name, "scales")),
                 getattr(self, self._sfx(name, "zeros")) if self.bits == 4 else None]
        return parts if e is None else [p if p is None else p[e] for p in parts]

    def _matmul(self, x, name: str, e: int | torch.Tensor | None = None):
        """x [..., K] @ W^T for the weight `name` (expert e of a stack) -> [..., N], in x's dtype. Compiled, e may
        also be a tensor of one expert per row of x (gathered, as Experts.forward_gathered)."""
        N, dtype = getattr(self, name).shape[-2], self._dtype(x)
        x_MK = x.reshape(-1, x.shape[-1]).to(dtype)
        ops = self._kernel_ops(name, dtype, x.device)
        if ops is not None:
            gathered = torch.is_tensor(e)
            ops = ops if e is None or gathered else [p if p is None else p[e] for p in ops]  # views of the stacks
            e = e if gathered else None
            # compiled: opaque to inductor, our C++ op itself (a decode step) or through woq_mm
            if (gathered or torch.compiler.is_compiling()) and not cpu_kernels.calls_ours(ops, x_MK.shape[0], gathered):
                y = woq_mm(x_MK, *ops, self.group_size or 0, e)
            else:
                y = kernel_matmul(x_MK.contiguous(), *ops, self.group_size, e)
        else:
            w = dequantize(*self._parts(name, e), self._layout.get(name)).to(dtype)
            few = torch.compiler.is_compiling() and x_MK.shape[0] <= FEW_ROWS
            y = mv(x_MK, w) if few else F.linear(x_MK, w)  # mv: fused, the quantized weights are read once
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    def _dtype(self, x) -> torch.dtype:
        """compute_dtype; "auto": x's own for the AVX2 kernels, else bf16 (torch's: fp32 is 10-30x slower)."""
        if self.compute_dtype != "auto":
            return self.compute_dtype or x.dtype
        return x.dtype if x.device.type == "cpu" and cpu_kernels.ours(self.bits) else torch.bfloat16

    def _kernel_ops(self, name: str, dtype: torch.dtype, device: torch.device):
        """The CPU kernel's operands for weight `name` (all experts), once per weight version, or None: no kernel.
        Compiled code takes what an eager call built (generation prefills eagerly), else dequantizes."""
        if torch.compiler.is_compiling():
            ops = self._packed.get(name)
            return ops if self.use_kernel and ops is not None and self._packed_key[name][0] == dtype else None
        if not (self.use_kernel and dtype in (torch.float32, torch.bfloat16, torch.float16)
                and kernel_applies(self.bits, getattr(self, name).shape[-2], self.group_size, device)):
            return None
        if self.bits == 4 and name not in self._layout and not cpu_kernels.ours(4):
            self._relayout(name)  # torch's layout, held in place of ours (where it is known)
        key = self._key(name, dtype)
        if self._packed_key.get(name) != key:
            if self.bits == 4 and cpu_kernels.ours(4) and self._compact(name):
                key = self._key(name, dtype)
            self._packed[name] = kernel_operands(*self._parts(name), dtype, name in self._layout)
            self._packed_key[name] = key
        return self._packed[name]

    def _key(self, name: str, dtype: torch.dtype) -> tuple:
        """What the kernel operands of `name` were built from: the dtype, the kernels, the tensors and versions."""
        parts = [p for p in self._parts(name) if p is not None]
        return (dtype, cpu_kernels.ours(self.bits), *(p.data_ptr() for p in parts), *(p._version for p in parts))

    def _compact(self, name: str) -> bool:
        """Hold int4 weight `name`'s fp32 scales and zeros as bf16 in place, where they are bf16 values (quantize_int4
        makes them so): the AVX2 kernels read them as stored, and a decode step reads 16 % fewer bytes (4-bit
        weights + 2 x fp32 a group of 32: 0.75 byte a weight; with bf16 0.625). state_dict() gives them in fp32.
        Whether it did."""
        keys = [self._sfx(name, what) for what in ("scales", "zeros")]
        if not all(self._buffers[k].dtype == torch.float32 and torch.equal(self._buffers[k].bfloat16().float(),
                                                                           self._buffers[k]) for k in keys):
            return False  # bf16 already (a bf16 model), or quantized before scales were bf16 values
        for k in keys:
            self._buffers[k] = self._buffers[k].bfloat16()
            self._as_fp32.add(k)
        return True

    def _apply(self, fn, recurse=True):
        """.to() and the like: scales / zeros held in bf16 for fp32 are cast as fp32 ones would be, and given as
        that dtype by state_dict (the operands are rebuilt: new tensors)."""
        for k in self._as_fp32:
            self._buffers[k] = self._buffers[k].float()
        self._as_fp32.clear()
        return super()._apply(fn, recurse)

    def _relayout(self, name: str) -> int | None:
        """Re-pack int4 weight `name` (all experts) into torch's layout as a new buffer; None if it is not known."""
        block, buf = int4_block(), getattr(self, name)
        if block is None or buf.shape[-2] % block:
            return None
        new = torch.empty_like(buf)
        for src, dst in zip(buf.reshape(-1, *buf.shape[-2:]), new.view(-1, *buf.shape[-2:])):  # one expert at a time
            dst.copy_(to_kernel_layout(unpack_nibbles(src), block))
        self._buffers[name], self._layout[name] = new, block
        return block

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        want = torch.int8 if self.bits == 8 else torch.uint8
        for name, buf in self._buffers.items():
            t = state_dict.get(prefix + name)
            if t is not None and (t.dtype != buf.dtype if buf.dtype == want else not t.is_floating_point()):
                raise TinyMixtralError(f"{prefix}{name} has dtype {t.dtype}; a {self.bits}-bit quantized weight "
                                       f"needs {buf.dtype} (is config.json's quantization block right?)")
        for name in [n for n in self._as_fp32 if prefix + n in state_dict]:  # loaded: fp32 buffers again
            self._buffers[name] = torch.empty_like(self._buffers[name], dtype=torch.float32)
            self._as_fp32.discard(name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in [n for n in self._layout if prefix + n in state_dict]:  # loaded in the storage layout
            del self._layout[name]


def _storage_layout(module: _Quantized, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict() post-hook: int4 weights held in the kernel's layout are given in the storage layout."""
    for name, block in module._layout.items():
        state_dict[prefix + name] = cpu_kernels.storage_copy(state_dict[prefix + name], block)
    for name in module._as_fp32:
        if state_dict[prefix + name].dtype == torch.bfloat16:
            state_dict[prefix + name] = state_dict[prefix + name].float()


class QuantLinear(_Quantized):
    """nn.Linear (no bias) with an int8 / int4 weight: buffers weight, scales[, zeros]."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None, device=None):
        super().__init__(bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self._add("weight", (out_features, in_features), device)

    def forward(self, x):
        return self._matmul(x, "weight")


class QuantExperts(_Quantized, Experts):
    """Experts with int8 / int4 w13 [E, 2F, D] and w2 [E, D, F]: Experts.forward, with the products overridden."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, bits: int, group_size: int | None = None, device=None):
        super().__init__(bits, group_size)
        self.n_experts = n_experts
        self._add("w13", (n_experts, 2 * d_ff, d_model), device)
        self._add("w2", (n_experts, d_model, d_ff), device)

    def grouped_mm(self, x_MI, name: str, counts_E):
        ys = [self._matmul(x_e, name, e) for e, x_e in enumerate(x_MI.split(counts_E.tolist())) if len(x_e)]
        return torch.cat(ys) if ys else x_MI.new_zeros(0, getattr(self, name).shape[-2])

    def expert_mm(self, x, name: str, e):
        return self._matmul(x, name, e)

    def gathers(self, x_ND) -> bool:  # our kernels: each chosen expert read once for up to 4 of its rows, no sync
        return all((ops := self._kernel_ops(name, self._dtype(x_ND), x_ND.device)) is not None
                   and cpu_kernels.calls_ours(ops, x_ND.shape[0], True) for name in ("w13", "w2"))


# ---- which modules, and the swap ------------------------------------------------------------------
def targets(model: nn.Module, q: dict) -> dict[str, nn.Module]:
    """Name -> module for the Linear and Experts modules that `q` quantizes (none under a skipped name)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Experts)) and not isinstance(m, _Quantized)
            and not set(name.split(".")) & set(q["skip"])}


def swap_modules(model: nn.Module, q: dict) -> nn.Module:
    """Replace the target modules by empty QuantLinear / QuantExperts (same device), in place; load weights after."""
    for name, m in targets(model, q).items():
        if isinstance(m, Experts):
            E, F2, D = m.w13.shape
            new = QuantExperts(E, D, F2 // 2, q["bits"], q["group_size"], m.w13.device)
        else:
            new = QuantLinear(m.in_features, m.out_features, q["bits"], q["group_size"], m.weight.device)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model


def compile_pays(model: nn.Module) -> bool:
    """Whether a compiled decode step should beat the eager one: not where an int4 weight misses the CPU kernel
    (inductor's own int4 dequantize measured ~10x slower than the eager kernel, tiny-mixtral, 2 threads)."""
    return not any(isinstance(m, _Quantized) and m.bits == 4 and not (m.use_kernel and all(
        kernel_applies(4, b.shape[-2], m.group_size, b.device) for b in m.buffers() if b.dtype == torch.uint8))
        for m in model.modules())


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Activation dtype of every quantized matmul in `model` (None: the activations' own)."""
    for m in model.modules():
        if isinstance(m, _Quantized):
            m.compute_dtype = dtype
    return model
