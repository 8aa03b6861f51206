"""tinymixtral: a small, fast, hackable Mixtral (sparse Mixture-of-Experts LM) in PyTorch."""

from .checkpoint import load_model, save_model
from .config import PRESETS, ModelConfig
from .errors import TinyMixtralError
from .model.transformer import Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "TinyMixtralError", "load_model", "save_model"]
__version__ = "0.1.0"
