"""Model configuration: one dataclass, presets stored as data, and the map to HF `config.json`.

Field names are short paper names (d_model, n_heads, ...); `HF_FIELDS` maps them one to one onto the
Hugging Face names, so a config round-trips through `config.json` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import TinyMixtralError

MAX_SIZE = 2**31 - 1  # the largest dimension, count or length a config may hold


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # tokens in the vocabulary (at least the tokenizer's)
    d_model: int = 512  # width of the residual stream
    n_layers: int = 8  # decoder blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention; n_heads must be a multiple)
    head_dim: int | None = None  # None: d_model // n_heads (resolved at construction)
    d_ff: int = 2048  # hidden size of each expert (or of the dense FFN)
    n_experts: int = 8  # 0 = dense model (Mistral): one SwiGLU FFN per layer, no router
    top_k: int = 2  # experts per token
    sliding_window: int | None = None  # attend to the last `sliding_window` tokens, self included
    max_seq_len: int = 32768  # longest sequence (HF max_position_embeddings)
    rope_theta: float = 1e6  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # the LM head is the token embedding
    init_std: float = 0.02  # std of the normal initialisation of every matrix
    bos_token_id: int | None = 1  # beginning-of-sequence id (set from the data's tokenizer)
    eos_token_id: int | None = 2  # end-of-sequence id (set from the data's tokenizer)
    pad_token_id: int | None = None  # padding id, if any
    # Training-time routing options; each is off unless set.
    router_aux_loss_coef: float = 0.0  # Switch load-balancing loss (HF formula)
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss
    router_jitter_noise: float = 0.0  # multiply the router input by U(1-eps, 1+eps)
    noisy_gating: bool = False  # Shazeer 2017 noisy top-k: learned, softplus-scaled Gaussian noise
    capacity_factor: float | None = None  # None: dropless; else each expert keeps <= ceil(cf*N*K/E) tokens
    # Set by `tinymixtral quantize` (weight-only int8/int4, see quantize.py); None = full precision.
    # Written to config.json as "quantization", a key transformers does not read (unlike quantization_config).
    quantization: dict | None = None  # written by `tinymixtral quantize`; not a training option

    def __post_init__(self):
        if self.head_dim is None:
            if self.n_heads > 0 and self.d_model % self.n_heads != 0:
                _bad("head_dim", None, f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set head_dim")
            self.head_dim = self.d_model // max(self.n_heads, 1)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _bad(name, value, "must be a positive integer")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
                     "n_experts", "top_k", "sliding_window"):
            if isinstance(getattr(self, name), int) and getattr(self, name) > MAX_SIZE:  # torch sizes overflow
                _bad(name, getattr(self, name), f"must be at most {MAX_SIZE:,}")
        for name in ("rope_theta", "norm_eps", "router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise",
                     "init_std", "capacity_factor"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):  # NaN slips past every comparison below
                _bad(name, value, "must be finite")
        if self.n_heads % self.n_kv_heads != 0:
            _bad("n_kv_heads", self.n_kv_heads, f"n_heads ({self.n_heads}) must be divisible by n_kv_heads")
        if self.head_dim % 2 != 0:
            _bad("head_dim", self.head_dim, "must be even (rotary embedding rotates pairs)")
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            _bad("n_experts", self.n_experts, "must be >= 0 (0 = dense)")
        if self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts:
            _bad("top_k", self.top_k, f"must be between 1 and n_experts ({self.n_experts})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            _bad("sliding_window", self.sliding_window, "must be a positive integer or null")
        if not self.rope_theta > 0:
            _bad("rope_theta", self.rope_theta, "must be > 0")
        if not self.norm_eps > 0:
            _bad("norm_eps", self.norm_eps, "must be > 0")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "init_std"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        if self.router_jitter_noise >= 1:
            _bad("router_jitter_noise", self.router_jitter_noise, "must be < 1")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            _bad("capacity_factor", self.capacity_factor, "must be > 0 or null (dropless)")
        if self.quantization is not None:
            _check_quantization(self.quantization, self.tie_embeddings)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def model_type(self) -> str:
        return "mixtral" if self.is_moe else "mistral"

    def replace(self, **overrides) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in fields(self)}
        for key in overrides:
            if key not in known:
                raise TinyMixtralError(f"unknown config field {key!r}; known fields: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        """A preset by exact name, with optional field overrides."""
        if name not in PRESETS:
            raise TinyMixtralError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**PRESETS[name]).replace(**overrides) if overrides else cls(**PRESETS[name])

    # ---- Hugging Face config.json -------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers writes for this model."""
        d: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": self.model_type,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
        }
        for ours, theirs in HF_FIELDS.items():
            if not self.is_moe and ours in _MOE_ONLY:
                continue
            d[theirs] = getattr(self, ours)
        # transformers 5 reads rope_parameters, 4.x reads rope_theta: write both.
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        for name in _EXTRA_FIELDS:  # ours only; transformers keeps unknown fields as attributes
            if getattr(self, name) != _DEFAULTS[name]:
                d[name] = getattr(self, name)
        return dict(sorted(d.items()))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a HF config.json dict (mixtral or mistral); unknown fields are an error."""
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type not in ("mixtral", "mistral"):
            raise TinyMixtralError(f"config.json has model_type {model_type!r}; expected 'mixtral' or 'mistral'")
        act = d.pop("hidden_act", "silu")
        if act != "silu":
            raise TinyMixtralError(f"config.json field hidden_act={act!r} is not supported; expected 'silu'")
        rope = d.pop("rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise TinyMixtralError(f"config.json rope_type {rope.get('rope_type')!r} is not supported; expected 'default'")
        if d.get("rope_scaling"):
            raise TinyMixtralError(f"config.json field rope_scaling={d['rope_scaling']!r} is not supported")
        kwargs: dict[str, Any] = {"router_aux_loss_coef": 0.001} if model_type == "mixtral" else {}  # HF default
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        inverse = {theirs: ours for ours, theirs in HF_FIELDS.items()}
        for key, value in d.items():
            if key in inverse:
                if not (key == "rope_theta" and "rope_theta" in rope):
                    kwargs[inverse[key]] = value
            elif key in _EXTRA_FIELDS:
                kwargs[key] = value
            elif key in _HF_IGNORED:
                continue
            else:
                raise TinyMixtralError(f"config.json has unknown field {key!r} (value {value!r})")
        if model_type == "mistral":
            kwargs["n_experts"] = 0
            kwargs.pop("top_k", None)
        elif kwargs.get("n_experts", 8) == 0:
            raise TinyMixtralError("config.json of model_type 'mixtral' has num_local_experts=0")
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if d.get("attention_dropout", 0.0):
            raise TinyMixtralError(f"config.json attention_dropout={d['attention_dropout']} is not supported; expected 0")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a config.json (HF format) or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise TinyMixtralError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TinyMixtralError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise TinyMixtralError(f"{path} must hold a JSON object")
        if "model_type" not in d and "d_model" in d:  # our own field names are accepted too
            try:
                return cls(**d)
            except TypeError as e:
                raise TinyMixtralError(f"{path}: {e}") from None
        return cls.from_hf_dict(d)


def _bad(field: str, value, why: str):
    raise TinyMixtralError(f"config field {field}={value!r}: {why}")


QUANT_METHOD = "tinymixtral-weight-only"


def _check_quantization(q, tied: bool):
    """The "quantization" block written by `tinymixtral quantize` (only the checks a hand edit could break)."""
    if not isinstance(q, dict) or q.get("method") != QUANT_METHOD:
        _bad("quantization", q, f"must be written by `tinymixtral quantize` (method {QUANT_METHOD!r})")
    bits, group, skip = q.get("bits"), q.get("group_size"), q.get("skip")
    if bits not in (4, 8):
        _bad("quantization", q, "bits must be 8 or 4")
    if (bits == 8) != (group is None) or not (group is None or isinstance(group, int) and group > 0):
        _bad("quantization", q, "group_size must be null for 8 bits (per channel) and a positive integer for 4")
    if not isinstance(skip, list) or "router" not in skip or (tied and "lm_head" not in skip):
        _bad("quantization", q, "skip must list 'router' (and 'lm_head' when the head is tied to the embedding)")


# ours -> HF config.json
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "d_ff": "intermediate_size",
    "n_experts": "num_local_experts",
    "top_k": "num_experts_per_tok",
    "sliding_window": "sliding_window",
    "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "router_aux_loss_coef": "router_aux_loss_coef",
    "router_jitter_noise": "router_jitter_noise",
}
_MOE_ONLY = {"n_experts", "top_k", "router_aux_loss_coef", "router_jitter_noise"}
_EXTRA_FIELDS = ("router_z_loss_coef", "noisy_gating", "capacity_factor", "quantization")
_DEFAULTS = {f.name: f.default for f in fields(ModelConfig)}
# Fields transformers writes that do not change the maths (or are checked above).
_HF_IGNORED = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "output_router_logits",
    "attention_dropout", "_name_or_path", "rope_scaling", "quantization_config", "use_sliding_window",
    "max_window_layers", "layer_types", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "is_encoder_decoder", "tokenizer_class", "chunk_size_feed_forward", "problem_type",
}

# Presets: data, not code. Real models link to the config.json they mirror.
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to learn short stories in minutes on 2 CPU cores.
    "demo": dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
                 n_experts=4, top_k=2, sliding_window=256, max_seq_len=1024, rope_theta=1e4,
                 tie_embeddings=True, router_aux_loss_coef=0.01),
    # Between demo and tiny-mixtral: an hour on a CPU, minutes on a GPU.
    "small": dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=768,
                  n_experts=8, top_k=2, sliding_window=512, max_seq_len=2048, rope_theta=1e4,
                  tie_embeddings=True, router_aux_loss_coef=0.01),
    # The seed's model: Mixtral's vocabulary with a 512-wide, 8-layer, 8-expert body.
    "tiny-mixtral": dict(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                         d_ff=2048, n_experts=8, top_k=2, sliding_window=256, max_seq_len=4096,
                         rope_theta=1e6, router_aux_loss_coef=0.02),
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    "mixtral-8x7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         d_ff=14336, n_experts=8, top_k=2, sliding_window=None, max_seq_len=32768,
                         rope_theta=1e6, norm_eps=1e-5, router_aux_loss_coef=0.02),
    # https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json
    "mixtral-8x22b": dict(vocab_size=32768, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128,
                          d_ff=16384, n_experts=8, top_k=2, sliding_window=None, max_seq_len=65536,
                          rope_theta=1e6, norm_eps=1e-5, router_aux_loss_coef=0.001),
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json (dense)
    "mistral-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                       d_ff=14336, n_experts=0, sliding_window=4096, max_seq_len=32768, rope_theta=1e4,
                       norm_eps=1e-5),
}


def capacity(n_tokens: int, cfg: ModelConfig) -> int:
    """Tokens each expert may take under `capacity_factor` (Switch Transformer, eq. 3)."""
    assert cfg.capacity_factor is not None, "capacity() needs capacity_factor"
    # Past n_experts / top_k every expert may take every token (nothing is dropped): the same, without overflow.
    factor = min(cfg.capacity_factor, cfg.n_experts / cfg.top_k)
    return math.ceil(factor * n_tokens * cfg.top_k / cfg.n_experts)
