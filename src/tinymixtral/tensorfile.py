"""safetensors files read one tensor at a time into memory the caller chose, and written without a copy.

The `safetensors` package maps a whole file and keeps every page it touched resident until the file
is closed, and its writer serialises a whole shard into bytes first: each holds a checkpoint (or a
shard) a second time. The format is simple (8-byte header length, a JSON header of dtype / shape /
byte offsets, then the raw little-endian bytes), so loading reads each tensor's bytes straight into
its place in the model, and saving writes each tensor's own memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from .errors import TinyMixtralError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """The header of one .safetensors file; read(name) / read_into(name, out) read one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if not 2 <= n <= min(size - 8, 100 * 2**20):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {}
            for name, e in header.items():
                start, end = (8 + n + o for o in e["data_offsets"])
                dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
                if end > size or end - start != _numel(shape) * dtype.itemsize:
                    raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
                self.entries[name] = (dtype, shape, start)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:  # JSONDecodeError is a ValueError
            raise TinyMixtralError(f"cannot read {self.path}: not a valid safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, _ = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `name` into `out` (same shape; any dtype, cast on the way; CPU)."""
        dtype, shape, start = self.entries[name]
        assert tuple(out.shape) == shape, f"{name}: {shape} read into {tuple(out.shape)}"
        direct = out.dtype == dtype and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=dtype)  # a cast goes through one tensor's copy
        with open(self.path, "rb") as f:
            f.seek(start)
            view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
            if f.readinto(view) != len(view):
                raise TinyMixtralError(f"cannot read {self.path}: truncated at tensor {name}")
        if not direct:
            out.copy_(buf)
        return out


def write(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Write tensors (CPU, contiguous) as one .safetensors file, from their own memory (no serialised copy)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        assert t.device.type == "cpu" and t.is_contiguous(), f"{name} must be a contiguous CPU tensor"
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
