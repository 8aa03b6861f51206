"""A Mixtral ("frankenMoE") from dense models, mergekit-moe style.

The YAML is mergekit-moe's (https://github.com/arcee-ai/mergekit, moe.md):

    base_model: path/to/base            # attention, norms, embedding and head come from here
    gate_mode: hidden                   # hidden | cheap_embed | random
    dtype: bfloat16                     # float32 | bfloat16 | float16 (default: the base's)
    experts_per_token: 2                # top-k (default 2, as mergekit)
    experts:
      - source_model: path/to/expert1   # expert i of every layer = this model's FFN of that layer
        positive_prompts: ["..."]
        negative_prompts: ["..."]       # optional

Sources are local model directories (relative paths are relative to the YAML's folder), Hugging Face or
Mistral-native, dense Mistral-architecture models with the base's vocabulary, width and depth. The output
is what mergekit-moe 0.1.4 writes for the same YAML (benchmarks/mergekit_parity.py checks it against the
tool): every copied tensor cast to `dtype` (the YAML's, else the base config.json's, else the stored
embedding's), routers as below, sliding_window dropped and "dtype" recorded in config.json. Routers (one
vector per expert and layer, router logit = x . v), as mergekit's get_gate_params makes them:
- hidden: the base model in bf16 is run on "<s>" + each prompt; per layer, the residual stream entering
  the layer at the prompt's last token, averaged over the positive prompts (in bf16), minus the same
  average over the negative prompts, L2-normalised. mergekit pads a batch on the left with masked BOS
  tokens; one prompt at a time gives the same vectors to bf16 rounding.
- cheap_embed: the L2-normalised sum of the prompts' token embeddings (fp32), positive minus negative,
  normalised again; the same vectors in every layer.
- random: normal(0, 1) (mergekit's torch.randn), seeded.
The prompt ids are those of transformers' tokenizer on bos_token + prompt (see prompt_ids).

Streaming: the output is written tensor by tensor (streaming.ModelWriter) as it is read from the sources;
only gate_mode hidden loads a model (the base, in bf16), and frees it before the copying starts.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from . import native
from .build import skeleton
from .checkpoint import has_tokenizer, load_model
from .config import ModelConfig
from .convert import to_hf
from .errors import TinyMixtralError
from .streaming import ModelWriter, open_weights
from .tokenizer import load_tokenizer

GATE_MODES = ("hidden", "cheap_embed", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOP_KEYS = {"base_model", "gate_mode", "dtype", "experts_per_token", "experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts"}
UNSUPPORTED = {  # mergekit-moe features we know of and do not implement
    "shared_experts": "shared experts (Qwen-MoE / DeepSeek outputs)",
    "noise_scale": "per-expert noise_scale", "residual_scale": "per-expert residual_scale",
    "tokenizer": "per-expert tokenizers", "tokenizer_source": "tokenizer_source",
}
DEGENERATE_COSINE = 0.98


# ---- the config -------------------------------------------------------------------------------------
def read_config(config: dict | str | Path) -> tuple[dict, Path]:
    """The config dict and the folder its relative paths start from (the YAML's folder, or the cwd)."""
    if isinstance(config, dict):
        return config, Path.cwd()
    path = Path(config)
    if not path.is_file():
        raise TinyMixtralError(f"merge config not found: {path}")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TinyMixtralError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise TinyMixtralError(f"{path} must hold a YAML mapping (base_model, gate_mode, experts, ...)")
    return d, path.resolve().parent


def check_config(d: dict, root: Path) -> dict:
    """Validate a mergekit-moe config; returns it normalised (absolute paths, defaults filled in)."""
    for key in d:
        if key in UNSUPPORTED:
            raise TinyMixtralError(f"merge config: {key!r} ({UNSUPPORTED[key]}) is not supported")
        if key not in TOP_KEYS:
            raise TinyMixtralError(f"merge config: unknown key {key!r}; supported: {', '.join(sorted(TOP_KEYS))}")
    if str(d.get("architecture", "mixtral")).lower() != "mixtral":
        raise TinyMixtralError(f"merge config: architecture {d['architecture']!r} is not supported; only 'mixtral'")
    if "base_model" not in d:
        raise TinyMixtralError("merge config: 'base_model' is missing")
    mode = d.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise TinyMixtralError(f"merge config: gate_mode {mode!r} is not supported; use one of {', '.join(GATE_MODES)}")
    dtype = d.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise TinyMixtralError(f"merge config: dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    experts = d.get("experts")
    if not isinstance(experts, list) or not experts:
        raise TinyMixtralError("merge config: 'experts' must be a non-empty list of {source_model, positive_prompts}")
    k = d.get("experts_per_token", 2)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(experts):
        raise TinyMixtralError(f"merge config: experts_per_token must be an integer between 1 and the number of "
                               f"experts ({len(experts)}), got {k!r}")
    out = {"base_model": _model_dir(d["base_model"], root, "base_model"), "gate_mode": mode, "dtype": dtype,
           "experts_per_token": k, "experts": []}
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            raise TinyMixtralError(f"merge config: experts[{i}] must be a mapping with source_model and prompts")
        for key in e:
            if key in UNSUPPORTED:
                raise TinyMixtralError(f"merge config: experts[{i}].{key} ({UNSUPPORTED[key]}) is not supported")
            if key not in EXPERT_KEYS:
                raise TinyMixtralError(f"merge config: experts[{i}] has unknown key {key!r}; "
                                       f"supported: {', '.join(sorted(EXPERT_KEYS))}")
        if "source_model" not in e:
            raise TinyMixtralError(f"merge config: experts[{i}] has no source_model")
        pos = _prompts(e.get("positive_prompts"), f"experts[{i}].positive_prompts")
        neg = _prompts(e.get("negative_prompts"), f"experts[{i}].negative_prompts")
        if mode != "random" and not pos:
            raise TinyMixtralError(f"merge config: experts[{i}] has no positive_prompts, which gate_mode "
                                   f"{mode!r} needs")
        out["experts"].append({"source_model": _model_dir(e["source_model"], root, f"experts[{i}].source_model"),
                               "positive_prompts": pos, "negative_prompts": neg})
    prompts = [(tuple(e["positive_prompts"]), tuple(e["negative_prompts"])) for e in out["experts"]]
    if mode != "random" and len(prompts) > 1 and len(set(prompts)) == 1:
        raise TinyMixtralError("merge config: every expert has the same prompts, so every router vector would be "
                               "the same; give each expert prompts of what it should receive")
    return out


def _prompts(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise TinyMixtralError(f"merge config: {where} must be a list of non-empty strings")
    return value


def _model_dir(value, root: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise TinyMixtralError(f"merge config: {where} must be a path to a local model directory, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if "+" in value and not path.exists():
        raise TinyMixtralError(f"merge config: {where}: 'model+lora' sources are not supported ({value!r})")
    if not (path / "config.json").is_file() and not (path / native.PARAMS).is_file():
        raise TinyMixtralError(f"merge config: {where}: no model directory at {path} (no config.json or "
                               f"{native.PARAMS}); sources must be local directories, relative to the YAML's folder")
    return path


# ---- router vectors ---------------------------------------------------------------------------------
def prompt_ids(tok, tok_dir: Path, prompt: str) -> list[int]:
    """The ids mergekit gives a prompt: transformers' tokenizer on bos_token + prompt, no special tokens added.

    That is BOS then the prompt's ids, unless the tokenizer_config.json says split_special_tokens (as
    tinymixtral's own tokenizers do): then "<s>" is read as text, so it is three tokens of text.
    """
    path = tok_dir / "tokenizer_config.json"
    conf = json.loads(path.read_text()) if path.is_file() else {}
    if not conf.get("split_special_tokens", False):
        return tok.encode(prompt, bos=True)
    bos = conf.get("bos_token", "<s>")
    return tok.encode((bos.get("content", "") if isinstance(bos, dict) else bos or "") + prompt)


@torch.no_grad()
def hidden_vector(model, ids: list[list[int]]) -> torch.Tensor:
    """[L, D]: the residual stream entering each layer at the last token of each prompt (token ids), averaged
    over the prompts in the model's dtype, as mergekit's get_hidden_states does."""
    captured: list[torch.Tensor] = []

    def grab(_module, args):  # the residual stream entering the layer, last position
        captured.append(args[0][0, -1])

    hooks = [layer.register_forward_pre_hook(grab) for layer in model.layers]
    rows = []
    try:
        for row in ids:
            if len(row) > model.cfg.max_seq_len:
                raise TinyMixtralError(f"merge: a prompt of {len(row)} tokens exceeds the base's max_seq_len "
                                       f"{model.cfg.max_seq_len}")
            captured.clear()
            model(torch.tensor([row], device=next(model.parameters()).device), last_only=True)
            rows.append(torch.stack(captured).cpu())
    finally:
        for h in hooks:
            h.remove()
    h_LBD = torch.stack(rows, dim=1)
    return h_LBD.sum(dim=1) / h_LBD.shape[1]


def cheap_embed_vector(embed_VD: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """[D]: the sum of the prompts' token embeddings, L2-normalised, in fp32 (mergekit's get_cheap_embedding)."""
    sums = [embed_VD[torch.tensor(row)].float().sum(dim=0) for row in ids]
    v = torch.stack(sums).sum(dim=0)
    return v / v.norm().clamp(min=1e-8)


def gate_vectors(base_dir: Path, base_files: dict, tok, experts: list[dict], mode: str, L: int, D: int,
                 seed: int = 0) -> torch.Tensor:
    """[L, E, D] router weights, one unit vector per layer and expert, as mergekit's get_gate_params makes them.

    hidden loads the base in bf16 (mergekit's torch_dtype) and computes in it; cheap_embed reads the stored
    embedding and computes in fp32; random is normal(0, 1).
    """
    E = len(experts)
    if mode == "random":
        return torch.randn(L, E, D, generator=torch.Generator().manual_seed(seed))
    key = "model.embed_tokens.weight"
    model = load_model(base_dir, dtype=torch.bfloat16) if mode == "hidden" else None  # freed when this returns
    embed_VD = base_files[key].read(key) if mode == "cheap_embed" else None

    def vector(prompts: list[str]) -> torch.Tensor:  # [L, D]
        ids = [prompt_ids(tok, base_dir, p) for p in prompts]
        return hidden_vector(model, ids) if model is not None else cheap_embed_vector(embed_VD, ids).expand(L, D)

    vecs = []
    for e in tqdm(experts, desc="expert prompts", unit="expert", disable=None, leave=False):
        v = vector(e["positive_prompts"])
        if e["negative_prompts"]:
            v = v - vector(e["negative_prompts"])
        vecs.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vecs, dim=1)


def degenerate_pairs(gates_LED: torch.Tensor, threshold: float = DEGENERATE_COSINE) -> list[tuple]:
    """(layer, i, j, cosine) for every pair of experts whose router vectors point nearly the same way."""
    unit = gates_LED.float() / gates_LED.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cos_LEE = unit @ unit.transpose(1, 2)
    E = gates_LED.shape[1]
    return [(layer, i, j, float(cos_LEE[layer, i, j])) for layer in range(gates_LED.shape[0])
            for i in range(E) for j in range(i + 1, E) if cos_LEE[layer, i, j] > threshold]


# ---- the merge --------------------------------------------------------------------------------------
FFN_SOURCES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}  # expert weight <- the dense MLP's


@torch.no_grad()
def merge(config: dict | str | Path, out: str | Path, seed: int = 0, max_shard_bytes: int = 5 * 2**30) -> ModelConfig:
    """Write the MoE a mergekit-moe config describes to `out` (a HF Mixtral directory); returns its config.

    Streams: the output is written tensor by tensor as it is read from the sources, so the most held at
    once is the base model in bf16 (for gate_mode hidden) or one tensor.
    """
    d, root = read_config(config)
    c = check_config(d, root)
    base_dir = c["base_model"]
    base_cfg, base_files = open_weights(base_dir)
    if base_cfg.is_moe:
        raise TinyMixtralError(f"merge: base_model {base_dir} is an MoE; merge takes dense Mistral-architecture models")
    sources = [open_weights(e["source_model"]) for e in c["experts"]]
    for i, (s, _) in enumerate(sources):
        where = f"experts[{i}].source_model ({c['experts'][i]['source_model']})"
        if s.is_moe:
            raise TinyMixtralError(f"merge: {where} is an MoE; sources must be dense Mistral-architecture models")
        for f in ("vocab_size", "d_model", "n_layers"):
            if getattr(s, f) != getattr(base_cfg, f):
                raise TinyMixtralError(f"merge: {where} has {f}={getattr(s, f)} but the base has "
                                       f"{getattr(base_cfg, f)}")
        if s.d_ff != sources[0][0].d_ff:
            raise TinyMixtralError(f"merge: {where} has d_ff={s.d_ff} but experts[0] has {sources[0][0].d_ff}; "
                                   "all experts need the same FFN size")
        _warn_tokenizer(base_dir, c["experts"][i]["source_model"], where)
    has_tok = has_tokenizer(base_dir)
    if c["gate_mode"] != "random" and not has_tok:
        raise TinyMixtralError(f"merge: gate_mode {c['gate_mode']!r} needs the base's tokenizer, but {base_dir} "
                               "has none")
    # mergekit's MixtralConfig(**base): its defaults for the router fields, and no sliding window
    cfg = base_cfg.replace(n_experts=len(c["experts"]), top_k=c["experts_per_token"], d_ff=sources[0][0].d_ff,
                           sliding_window=None, router_aux_loss_coef=0.001, router_jitter_noise=0.0)
    dtype = _out_dtype(c["dtype"], base_dir, base_files)
    plan = {key: (dtype, tuple(t.shape)) for key, t in to_hf(skeleton(cfg).state_dict(), cfg).items()}
    for key in plan:  # every source tensor is there, with its shape, before anything is computed or written
        src, name = _source(key, base_files, sources)
        if src is not None and (name not in src or tuple(src[name].shape(name)) != plan[key][1]):
            raise TinyMixtralError(f"merge: {name} is missing or misshapen in {_dir_of(key, c)}")
    tok = load_tokenizer(base_dir) if c["gate_mode"] != "random" else None
    gates_LED = gate_vectors(base_dir, base_files, tok, c["experts"], c["gate_mode"], cfg.n_layers, cfg.d_model, seed)
    for layer, i, j, cos in degenerate_pairs(gates_LED):
        print(f"merge: warning: layer {layer}: router vectors of experts {i} and {j} are nearly parallel "
              f"(cosine {cos:.3f}); their prompts may be too similar and one of them will be under-used",
              file=sys.stderr)
    with ModelWriter(out, cfg, plan, base_dir if has_tok else None, max_shard_bytes, dtype) as w:
        for key in tqdm(plan, desc="merging", unit="tensor", disable=None, leave=False):
            src, name = _source(key, base_files, sources)
            if src is not None:
                w.write(key, src[name].read(name).to(dtype))  # mergekit: tensor.to(out_dtype)
            elif key.endswith(".gate.weight"):
                w.write(key, gates_LED[int(key.split(".")[2])].to(dtype))
            else:  # ours only (noisy gating, carried over from the base config): starts at zero
                w.write(key, torch.zeros(plan[key][1], dtype=dtype))
    return cfg


def _source(key: str, base_files: dict, sources: list) -> tuple[dict | None, str]:
    """(the files, the HF name) a merged tensor is copied from; (None, key) for a router (computed here)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", key)
    if m:
        i, e, w = m.groups()
        return sources[int(e)][1], f"model.layers.{i}.mlp.{FFN_SOURCES[w]}.weight"
    return (None, key) if ".block_sparse_moe." in key else (base_files, key)


def _dir_of(key: str, c: dict) -> Path:
    m = re.search(r"\.experts\.(\d+)\.", key)
    return c["experts"][int(m.group(1))]["source_model"] if m else c["base_model"]


def _out_dtype(name: str | None, base_dir: Path, base_files: dict) -> torch.dtype:
    """The YAML's dtype, else the base config.json's dtype (torch_dtype), else the stored embedding's (mergekit's
    choice, except that with neither set mergekit keeps each tensor's own dtype)."""
    if name is None and (base_dir / "config.json").is_file():
        hf = json.loads((base_dir / "config.json").read_text())
        name = hf.get("dtype") or hf.get("torch_dtype")
        if name is not None and name not in DTYPES:
            raise TinyMixtralError(f"merge: {base_dir / 'config.json'} has dtype {name!r}; set dtype in the YAML "
                                   f"to one of {', '.join(DTYPES)}")
    if name is not None:
        return DTYPES[name]
    key = "model.embed_tokens.weight"
    return base_files[key].dtype(key)


def _warn_tokenizer(base_dir: Path, src_dir: Path, where: str):
    """Warn when an expert's tokenizer (whichever file load_tokenizer reads: tokenizer.model, tokenizer.model.v3,
    tokenizer.json) has another vocabulary than the base's; a side without a readable one is not compared."""
    try:
        ours, theirs = load_tokenizer(base_dir).identity(), load_tokenizer(src_dir).identity()
    except TinyMixtralError:
        return
    if ours != theirs:
        print(f"merge: warning: {where} has a different tokenizer from the base; experts should share the "
              "base's tokenizer", file=sys.stderr)
