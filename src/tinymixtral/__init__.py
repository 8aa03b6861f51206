"""tinymixtral: a small, fast, hackable Mixtral (sparse Mixture-of-Experts LM) in PyTorch."""

import importlib

from .alloc import huge_pages

huge_pages()  # before torch's first large tensor: see alloc.py

__version__ = "0.1.0"
# Imported on first use, so `tinymixtral --help` does not pay for importing torch.
_EXPORTS = {
    "ModelConfig": "config", "PRESETS": "config", "TinyMixtralError": "errors", "Transformer": "model.transformer",
    "build_model": "build", "load_model": "checkpoint", "save_model": "checkpoint", "generate": "generation",
    "stream": "generation", "load_tokenizer": "tokenizer", "routing_stats": "analysis.stats", "upcycle": "upcycling",
    "merge": "merging",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinymixtral' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
