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

Sources are local model directories (relative paths are relative to the YAML's folder), dense
Mistral-architecture models with the base's vocabulary, width and depth. Routers (one vector per expert
and layer, router logit = x . v):
- hidden: per layer, the base model's hidden state at the last token of each prompt (BOS prepended, as
  mergekit does), averaged over the positive prompts, minus the same average over the negative prompts,
  L2-normalised. mergekit takes the residual stream entering each decoder layer; we take the input of the
  layer's FFN (after the post-attention RMSNorm), which is exactly the vector the router multiplies.
- cheap_embed: the L2-normalised mean token embedding of the positive prompts minus that of the negative
  ones, normalised again; the same vectors in every layer (mergekit's formula).
- random: normal(0, 1) (mergekit's torch.randn), seeded.
Differences from mergekit: sliding_window is kept from the base (mergekit drops it), and the last real
token of each prompt is used (mergekit's padded batch can read a pad position).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from .build import build_model
from .checkpoint import has_tokenizer, load_model, save_model
from .config import ModelConfig
from .errors import TinyMixtralError
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
    if not (path / "config.json").is_file():
        raise TinyMixtralError(f"merge config: {where}: no model directory at {path} (config.json missing); "
                               "sources must be local directories, relative to the YAML's folder")
    return path


# ---- router vectors ---------------------------------------------------------------------------------
@torch.no_grad()
def hidden_vector(model, tok, prompts: list[str]) -> torch.Tensor:
    """[L, D]: mean over prompts of each layer's FFN input at the prompt's last token (BOS prepended)."""
    captured: list[torch.Tensor] = []
    hooks = [layer.ffn.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0][0, -1].float()))
             for layer in model.layers]
    try:
        total = torch.zeros(len(model.layers), model.cfg.d_model)
        for p in prompts:
            ids = tok.encode(p, bos=True)
            if len(ids) > model.cfg.max_seq_len:
                raise TinyMixtralError(f"merge: a prompt of {len(ids)} tokens exceeds the base's max_seq_len "
                                       f"{model.cfg.max_seq_len}")
            captured.clear()
            model(torch.tensor([ids], device=next(model.parameters()).device), last_only=True)
            total += torch.stack(captured).cpu()
    finally:
        for h in hooks:
            h.remove()
    return total / len(prompts)


@torch.no_grad()
def cheap_embed_vector(model, tok, prompts: list[str]) -> torch.Tensor:
    """[D]: L2-normalised mean token embedding of all the prompts' tokens (BOS included)."""
    ids = torch.tensor([t for p in prompts for t in tok.encode(p, bos=True)], device=model.embed.weight.device)
    v = model.embed(ids).float().mean(dim=0).cpu()
    return v / v.norm().clamp(min=1e-8)


def gate_vectors(base, tok, experts: list[dict], mode: str, seed: int = 0) -> torch.Tensor:
    """[L, E, D] router weights, one unit vector per layer and expert (mergekit's get_gate_params)."""
    L, D, E = base.cfg.n_layers, base.cfg.d_model, len(experts)
    if mode == "random":
        return torch.randn(L, E, D, generator=torch.Generator().manual_seed(seed))
    vector = hidden_vector if mode == "hidden" else cheap_embed_vector  # [L, D] or [D] (the same every layer)
    vecs = []
    for e in experts:
        v = vector(base, tok, e["positive_prompts"])
        if e["negative_prompts"]:
            v = v - vector(base, tok, e["negative_prompts"])
        v = v.expand(L, D)
        vecs.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(vecs, dim=1)


def degenerate_pairs(gates_LED: torch.Tensor, threshold: float = DEGENERATE_COSINE) -> list[tuple]:
    """(layer, i, j, cosine) for every pair of experts whose router vectors point nearly the same way."""
    unit = gates_LED.float() / gates_LED.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cos_LEE = unit @ unit.transpose(1, 2)
    E = gates_LED.shape[1]
    return [(layer, i, j, float(cos_LEE[layer, i, j])) for layer in range(gates_LED.shape[0])
            for i in range(E) for j in range(i + 1, E) if cos_LEE[layer, i, j] > threshold]


# ---- the merge --------------------------------------------------------------------------------------
def merge(config: dict | str | Path, out: str | Path | None = None, seed: int = 0):
    """Build (and with `out`, save) the MoE a mergekit-moe config describes; returns the Transformer."""
    d, root = read_config(config)
    c = check_config(d, root)
    base_dir = c["base_model"]
    base_cfg = ModelConfig.load(base_dir)
    if base_cfg.is_moe:
        raise TinyMixtralError(f"merge: base_model {base_dir} is an MoE; merge takes dense Mistral-architecture models")
    src_cfgs = [ModelConfig.load(e["source_model"]) for e in c["experts"]]
    for i, s in enumerate(src_cfgs):
        where = f"experts[{i}].source_model ({c['experts'][i]['source_model']})"
        if s.is_moe:
            raise TinyMixtralError(f"merge: {where} is an MoE; sources must be dense Mistral-architecture models")
        for f in ("vocab_size", "d_model", "n_layers"):
            if getattr(s, f) != getattr(base_cfg, f):
                raise TinyMixtralError(f"merge: {where} has {f}={getattr(s, f)} but the base has "
                                       f"{getattr(base_cfg, f)}")
        if s.d_ff != src_cfgs[0].d_ff:
            raise TinyMixtralError(f"merge: {where} has d_ff={s.d_ff} but experts[0] has {src_cfgs[0].d_ff}; "
                                   "all experts need the same FFN size")
        _warn_tokenizer(base_dir, c["experts"][i]["source_model"], where)
    has_tok = has_tokenizer(base_dir)
    if c["gate_mode"] != "random" and not has_tok:
        raise TinyMixtralError(f"merge: gate_mode {c['gate_mode']!r} needs the base's tokenizer, but {base_dir} "
                               "has none")
    base = load_model(base_dir)
    dtype = DTYPES[c["dtype"]] if c["dtype"] else next(base.parameters()).dtype  # mergekit: the base's dtype
    base = base.float()
    gates_LED = gate_vectors(base, load_tokenizer(base_dir) if has_tok else None, c["experts"], c["gate_mode"], seed)
    for layer, i, j, cos in degenerate_pairs(gates_LED):
        print(f"merge: warning: layer {layer}: router vectors of experts {i} and {j} are nearly parallel "
              f"(cosine {cos:.3f}); their prompts may be too similar and one of them will be under-used",
              file=sys.stderr)
    cfg = base_cfg.replace(n_experts=len(c["experts"]), top_k=c["experts_per_token"], d_ff=src_cfgs[0].d_ff)
    sd = {k: v for k, v in base.state_dict().items() if ".ffn." not in k}
    del base
    w13 = [[None] * cfg.n_experts for _ in range(cfg.n_layers)]
    w2 = [[None] * cfg.n_experts for _ in range(cfg.n_layers)]
    for e, spec in enumerate(c["experts"]):  # one source in memory at a time
        src = load_model(spec["source_model"], dtype=torch.float32)
        for i, layer in enumerate(src.layers):
            w13[i][e], w2[i][e] = layer.ffn.w13.weight.detach(), layer.ffn.w2.weight.detach()
        del src
    for i in range(cfg.n_layers):
        sd[f"layers.{i}.ffn.experts.w13"] = torch.stack(w13[i])
        sd[f"layers.{i}.ffn.experts.w2"] = torch.stack(w2[i])
        sd[f"layers.{i}.ffn.router.weight"] = gates_LED[i].float()
        if cfg.noisy_gating:
            sd[f"layers.{i}.ffn.router.noise.weight"] = torch.zeros(cfg.n_experts, cfg.d_model)
    model = build_model(cfg, sd, dtype=dtype).eval()
    if out is not None:
        save_model(model, out, tokenizer=base_dir if has_tok else None)
    return model


def _warn_tokenizer(base_dir: Path, src_dir: Path, where: str):
    for name in ("tokenizer.json", "tokenizer.model"):
        a, b = base_dir / name, src_dir / name
        if a.is_file() and b.is_file():
            if a.read_bytes() != b.read_bytes():
                print(f"merge: warning: {where} has a different {name} from the base; experts should share the "
                      "base's tokenizer", file=sys.stderr)
            return
