"""Model directories: Hugging Face's (config.json + safetensors, sharded with an index) and Mistral's native
one (params.json + consolidated.safetensors, see native.py), each with the tokenizer's files.

Everything is written to a temporary directory first and renamed into place, so an interrupted save
never leaves a half-written model. Weights are only ever read from safetensors: pickles are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from . import native, tensorfile
from .build import build_model, skeleton
from .config import ModelConfig
from .convert import hf_layout, to_hf
from .errors import TinyMixtralError
from .model.quant import quantize
from .model.transformer import Transformer
from .quantize import make_settings, quantized_keys
from .tensorfile import SafetensorsFile
from .tokenizer import VERSIONED

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
QUANT_CHUNK = 2**20  # elements quantized at once when loading with bits
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               bits: int | None = None, group_size: int | None = None):
    """A Transformer from a HF Mixtral/Mistral model directory, read one tensor at a time.

    Each tensor is read from its file straight into its place in the model (fused q/k/v and w1/w3,
    stacked experts), cast to `dtype` (default: as stored), or with bits=8|4 quantized on the way in
    (the schemes of `tinymixtral quantize`; router, norms and embeddings stay in full precision). The
    checkpoint is never held twice: the peak is the loaded model plus one tensor (in fp32 to quantize).
    """
    path = Path(path)
    if not path.exists():
        raise TinyMixtralError(f"model directory not found: {path}")
    if not path.is_dir():
        kind = "a pickle" if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl") else "a file"
        raise TinyMixtralError(f"{path} is {kind}, not a model directory (config.json + model.safetensors)")
    if model_format(path) == "mistral":
        cfg = native.read_params(path)
        files = dict.fromkeys((f := native.NativeFile(path / native.CONSOLIDATED, cfg)).keys(), f)
    else:
        cfg = ModelConfig.load(path / "config.json")
        files = {key: f for f in map(SafetensorsFile, weight_files(path)) for key in f.keys()}
    layout = hf_layout({key: f.shape(key) for key, f in files.items()}, cfg)
    q = make_settings(cfg, bits, group_size) if bits is not None else None
    quantized = quantized_keys(cfg, q) if q else {}
    model_cfg = cfg.replace(quantization=q) if q else cfg
    like = skeleton(model_cfg).state_dict()  # shape and dtype of every tensor, on meta
    sd = {}
    for name, parts in tqdm(layout.items(), desc=f"loading {path.name}", unit="tensor", disable=None, leave=False):
        if name in quantized:  # quantize block by block: rows are quantized independently
            names = {"weight": name, "scales": quantized[name] + "scales"}
            if bits == 4:
                names["zeros"] = quantized[name] + "zeros"
            # scales and zeros straight in the final dtype: no second copy when build_model casts
            out = {w: torch.empty(like[k].shape, dtype=dtype if dtype and like[k].is_floating_point() else like[k].dtype)
                   for w, k in names.items()}
            for key, index in parts:
                part = files[key].read(key)
                rows = max(1, QUANT_CHUNK // part.shape[-1])  # a few MB at a time: quantize's temporaries stay small
                for r in range(0, part.shape[-2], rows):
                    for w, t in quantize(part[..., r:r + rows, :].float(), bits, q["group_size"]).items():
                        out[w][index][..., r:r + rows, :] = t
            sd.update({names[w]: t for w, t in out.items()})
        else:
            first = parts[0][0]
            cast = dtype is not None and like[name].is_floating_point()  # a stored int8/int4 weight stays integer
            sd[name] = torch.empty(like[name].shape, dtype=dtype if cast else files[first].dtype(first))
            for key, index in parts:
                files[key].read_into(key, sd[name][index])
    return build_model(model_cfg, sd, dtype=dtype, device=device or "cpu").eval()


def model_config(path: str | Path) -> ModelConfig:
    """The config of a model directory, HF (config.json) or Mistral-native (params.json)."""
    path = Path(path)
    if not path.is_dir():
        raise TinyMixtralError(f"model directory not found: {path}" if not path.exists() else
                               f"{path} is a file, not a model directory (config.json + model.safetensors)")
    if model_format(path) == "mistral":
        return native.read_params(path)
    return ModelConfig.load(path / "config.json")


def model_format(path: Path) -> str:
    """'hf' or 'mistral' (native) for a model directory; a directory that mixes them is refused."""
    hf_weights = (path / WEIGHTS).is_file() or (path / INDEX).is_file()
    native_weights = (path / native.CONSOLIDATED).is_file()
    if (path / "config.json").is_file() and hf_weights:
        return "hf"  # the Hub's Mistral repos hold both formats of the same weights: read the HF one
    if (path / native.PARAMS).is_file():
        if native_weights:
            return "mistral"
        if hf_weights:
            raise TinyMixtralError(f"{path} mixes formats: params.json (Mistral native) with {WEIGHTS} (Hugging Face) "
                                   "but no config.json; add the config.json or the consolidated.safetensors")
        pth = sorted(p.name for p in path.glob("consolidated*.pt*"))
        if pth:
            raise TinyMixtralError(f"{path} holds only pickled weights ({pth[0]}); tinymixtral never unpickles files: "
                                   f"take the {native.CONSOLIDATED} that the model's repository also ships")
        raise TinyMixtralError(f"{path} has params.json but no {native.CONSOLIDATED}")
    if native_weights and (path / "config.json").is_file():
        raise TinyMixtralError(f"{path} mixes formats: config.json (Hugging Face) with {native.CONSOLIDATED} "
                               "(Mistral native) but no params.json")
    return "hf"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: model.safetensors, or the shards its index lists."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise TinyMixtralError(f"{path / INDEX} is not a valid safetensors index: {e}") from None
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        pickles = [p for p in PICKLES if (path / p).exists()]
        if pickles:
            raise TinyMixtralError(
                f"{path} holds only pickled weights ({pickles[0]}); tinymixtral never unpickles files, "
                "convert them to safetensors first"
            )
        raise TinyMixtralError(f"no {WEIGHTS} or {INDEX} in {path}")
    for name in files:
        if not (path / name).is_file():
            raise TinyMixtralError(f"weight shard listed in the index is missing: {path / name}")
    return [path / name for name in files]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, by HF key (small models: load_model reads big ones tensor by tensor)."""
    return {key: f.read(key) for f in map(SafetensorsFile, weight_files(path)) for key in f.keys()}


def save_model(model: Transformer, path: str | Path, tokenizer=None, max_shard_bytes: int = 5 * 2**30,
               format: str = "hf") -> Path:
    """Write `model` as a model directory: HF (transformers' from_pretrained loads it) or Mistral-native.

    tokenizer: an object with .save(directory) (tinymixtral.tokenizer.Tokenizer), or a directory whose
    tokenizer files are copied. HF weights are sharded above max_shard_bytes, with an index like
    transformers'; native weights are one consolidated.safetensors, as mistral-inference writes them.
    """
    if format not in ("hf", "mistral"):
        raise TinyMixtralError(f"format must be 'hf' or 'mistral', got {format!r}")
    cfg = model.cfg
    if format == "mistral":
        native.check_writable(cfg)
    path = Path(path)
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinyMixtralError(f"cannot make the directory {path.parent}: {e.strerror or e}") from None
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        hf_sd = {k: v.detach().cpu().contiguous() for k, v in to_hf(model.state_dict(), cfg).items()}
        if format == "mistral":
            (tmp / native.PARAMS).write_text(json.dumps(native.params_from_config(cfg), indent=2) + "\n")
            tensorfile.write(native.native_state_dict(hf_sd, cfg), tmp / native.CONSOLIDATED)
        else:
            cfg.save(tmp / "config.json")
            gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            _write_shards(hf_sd, tmp, max_shard_bytes)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        _replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only directory: nothing half-written is left
            raise TinyMixtralError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    return path


def _check_target(path: Path):
    """save_model replaces what is at `path`: only ever a model directory, an empty one, or nothing."""
    if path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise TinyMixtralError(f"{str(path) or repr('')} is the current directory (or above it): give a new directory")
    if path.exists() and not path.is_dir():
        raise TinyMixtralError(f"{path} is a file, not a model directory")
    is_model = (path / "config.json").is_file() or (path / native.PARAMS).is_file()
    if path.is_dir() and any(path.iterdir()) and not is_model:
        raise TinyMixtralError(f"{path} is a directory that holds no model (no config.json or {native.PARAMS}): "
                               "it would be replaced; give a new or empty directory")


def _write_shards(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int):
    shards, current, size = [], {}, 0
    for key, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        tensorfile.write(shards[0], out / WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensorfile.write(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tekken.json")


def tokenizer_files(path: str | Path) -> list[str]:
    """The tokenizer files a directory holds: TOKENIZER_FILES and Mistral's native tokenizer.model.vN."""
    src = Path(path)
    native_names = sorted(f.name for f in src.glob("tokenizer.model.v*") if VERSIONED.fullmatch(f.name))
    return [f for f in (*TOKENIZER_FILES, *native_names) if (src / f).is_file()]


def has_tokenizer(path: str | Path) -> bool:
    """Whether a directory holds tokenizer files that save_model(tokenizer=path) can copy."""
    return bool(tokenizer_files(path))


def _save_tokenizer(tokenizer, out: Path):
    if hasattr(tokenizer, "save"):
        tokenizer.save(out)
        return
    src = Path(tokenizer)
    found = tokenizer_files(src)
    if not found:
        raise TinyMixtralError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}, tokenizer.model.vN) in {src}")
    for f in found:
        shutil.copy2(src / f, out / f)


def _replace_dir(tmp: Path, path: Path):
    """Rename tmp to path; an existing path is moved aside first and removed after."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
