"""Model directories read and written one tensor at a time (`merge`, `upcycle`).

`open_weights` gives a directory's config and its tensors by Hugging Face name without reading any
(Hugging Face or Mistral-native layout), as `load_model` sees them.

`save_model` writes a model that is already in memory. A merge or an upcycle makes its output layer by
layer from tensors read off disk, so the output should go to disk as it is made: the caller first names
every tensor (dtype and shape, in the order it will write them), the shards are planned from those
sizes, and each shard's header goes to disk before its data. Each tensor's bytes are then written as
soon as it exists, and nothing holds more than the tensors being produced. The directory is what
`save_model` writes (config.json, generation_config.json, `model.safetensors` or numbered shards with
an index, the tokenizer's files), built in a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from . import native
from .checkpoint import INDEX, WEIGHTS, _check_target, _replace_dir, _save_tokenizer, model_format, weight_files
from .config import ModelConfig
from .errors import TinyMixtralError
from .tensorfile import NAMES, SafetensorsFile

Plan = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # HF key -> (dtype, shape), in writing order


def open_weights(path: str | Path) -> tuple[ModelConfig, dict]:
    """(config, {HF key: file}) of a model directory; file.read(key) / read_into(key, out) read one tensor."""
    path = Path(path)
    if not path.is_dir():
        raise TinyMixtralError(f"model directory not found: {path}")
    if model_format(path) == "mistral":
        cfg = native.read_params(path)
        f = native.NativeFile(path / native.CONSOLIDATED, cfg)
        return cfg, dict.fromkeys(f.keys(), f)
    cfg = ModelConfig.load(path / "config.json")
    return cfg, {key: f for f in map(SafetensorsFile, weight_files(path)) for key in f.keys()}


class ModelWriter:
    """`with ModelWriter(out, cfg, plan) as w: w.write(name, tensor)` for every tensor of `plan`, in order."""

    def __init__(self, path: str | Path, cfg: ModelConfig, plan: Plan, tokenizer=None,
                 max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None):
        """dtype: written to config.json as "dtype", the dtype transformers loads the model in (as mergekit does)."""
        self.path, self.cfg, self.tokenizer, self.dtype = Path(path), cfg, tokenizer, dtype
        self.shards: list[list[str]] = [[]]  # tensor names per shard, as save_model groups them
        size = 0
        for name, (dtype, shape) in plan.items():
            nbytes = _numel(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(name)
            size += nbytes
        self.plan, self.order = plan, list(plan)
        n = len(self.shards)
        self.files = [WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self._next, self._shard, self._left, self._file = 0, -1, 0, None  # _left: tensors left in this shard

    def __enter__(self) -> ModelWriter:
        _check_target(self.path)  # as save_model: never replace a file, a non-model directory or the cwd
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as e:
            raise TinyMixtralError(f"cannot write {self.path}: {e.strerror or e}") from e
        hf = self.cfg.to_hf_dict()
        if self.dtype is not None:
            hf["dtype"] = str(self.dtype).removeprefix("torch.")
        (self.tmp / "config.json").write_text(json.dumps(dict(sorted(hf.items())), indent=2) + "\n")
        gen = {"bos_token_id": self.cfg.bos_token_id, "eos_token_id": self.cfg.eos_token_id}
        (self.tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        return self

    def write(self, name: str, t: torch.Tensor):
        """Write the next tensor of the plan (its name, dtype and shape must be the planned ones)."""
        assert self._next < len(self.order) and name == self.order[self._next], \
            f"wrote {name}, expected {self.order[self._next] if self._next < len(self.order) else 'nothing more'}"
        dtype, shape = self.plan[name]
        assert t.dtype == dtype and tuple(t.shape) == shape, \
            f"{name}: {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}"
        if self._left == 0:
            self._open_next()
        t = t.detach().cpu().contiguous()
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1
        self._left -= 1

    def _open_next(self):
        self._close()
        self._shard += 1
        self._left = len(self.shards[self._shard])
        header, offset = {}, 0
        for name in self.shards[self._shard]:
            dtype, shape = self.plan[name]
            n = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # as tensorfile.write: the data starts 8-byte aligned
        self._file = open(self.tmp / self.files[self._shard], "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def _close(self):
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                assert self._next == len(self.order), f"only {self._next} of {len(self.order)} tensors written"
                self._close()
                if len(self.files) > 1:
                    total = sum(_numel(s) * d.itemsize for d, s in self.plan.values())
                    weight_map = {name: f for f, names in zip(self.files, self.shards) for name in names}
                    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                    (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
                if self.tokenizer is not None:
                    _save_tokenizer(self.tokenizer, self.tmp)
                _replace_dir(self.tmp, self.path)
        except BaseException as e:
            self._abandon()
            if isinstance(e, OSError):  # a full disk, a read-only directory: nothing half-written is left
                raise TinyMixtralError(f"cannot write {self.path}: {e.strerror or e}") from e
            raise
        if exc_type is not None:
            self._abandon()
            if issubclass(exc_type, OSError):
                raise TinyMixtralError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        return False

    def _abandon(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
