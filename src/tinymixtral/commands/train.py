"""`tinymixtral train` on the command line: every TrainConfig and ModelConfig field is a flag.

The loop itself is `tinymixtral.train.train`; this module only turns flags into the two configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
from pathlib import Path

from .. import train as T
from ..checkpoint import model_config, weight_files
from ..config import MAX_SIZE, ModelConfig
from ..data import load_split
from ..errors import TinyMixtralError
from ..train_config import RECIPES, TrainConfig, load_run_config
from . import compile_mode

_SKIP = {"data", "out"}  # positional to the run, not training knobs
# What --init-from lets change in the model's config: options of training-time routing, not of the weights.
ROUTING_OPTIONS = ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "capacity_factor")


def add_arguments(p):
    p.add_argument("--recipe", default=None, help=f"a named recipe ({', '.join(RECIPES)}): a preset and training "
                   "values, under the flags given (default: default)")
    p.add_argument("--preset", default=None, help="model preset (default: the recipe's, demo)")
    p.add_argument("--config", default=None, help="a model config.json instead of a preset")
    p.add_argument("--data", help="a prepared data directory")
    p.add_argument("--out", help="the run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run where it stopped")
    train = p.add_argument_group("training (TrainConfig fields)")
    docs = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _SKIP:
            _add_field(train, f, docs.get(f.name), show_default=True)
    model = p.add_argument_group("model overrides (ModelConfig fields)")
    docs = field_comments(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        _add_field(model, f, docs.get(f.name), show_default=False)


def field_comments(cls) -> dict[str, str]:
    """{field: the comment after it} in a dataclass's source: the flags' help cannot drift from the fields."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _add_field(group, f, comment: str | None, show_default: bool):
    flag = "--" + f.name.replace("_", "-")
    typ = str(f.type)
    default = "" if not show_default or f.default in (None, "") else f" (default {f.default})"
    help_text = ((comment or "") + default).strip().replace("%", "%%") or None  # argparse formats with %
    if f.name == "compile":
        group.add_argument(flag, dest=f.name, default=None, type=compile_mode, metavar="auto|true|false", help=help_text)
    elif "bool" in typ:
        group.add_argument(flag, dest=f.name, default=None, type=_bool, metavar="true|false", help=help_text)
    elif f.name == "max_time":
        group.add_argument(flag, dest=f.name, default=None, help=help_text)
    else:
        conv = int if typ.startswith("int") else float if typ.startswith("float") else str
        group.add_argument(flag, dest=f.name, default=None, type=conv, help=help_text)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    # argparse turns this into its usual "error: argument --flag: ..." and exit 2; any other exception
    # type raised from a `type=` converter escapes parse_args as a traceback.
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run(args) -> int:
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    given = {k: v for k, v in vars(args).items() if v is not None}
    train_over = {k: v for k, v in given.items() if k in train_fields and k not in _SKIP}
    model_over = {k: v for k, v in given.items() if k in model_fields}
    if "max_time" in train_over:
        train_over["max_time"] = parse_duration(train_over["max_time"])
    vocab_from_data = False
    if args.resume:
        if args.recipe:
            raise TinyMixtralError("--recipe cannot change when resuming a run (run.json holds its values)")
        tcfg, mcfg = load_run_config(Path(args.resume))
        if model_over:
            raise TinyMixtralError("model fields cannot change when resuming a run")
        for name in ("init_from", "train_only"):  # the optimizer state holds exactly the trained parameters
            if name in train_over and train_over[name] != getattr(tcfg, name):
                raise TinyMixtralError(f"--{name.replace('_', '-')} cannot change when resuming a run")
        tcfg = dataclasses.replace(tcfg, out=args.resume, **train_over)
    else:
        if not args.data or not args.out:
            raise TinyMixtralError("train needs --data DIR and --out RUN_DIR (or --resume RUN_DIR)")
        if (args.recipe or "default") not in RECIPES:
            raise TinyMixtralError(f"unknown --recipe {args.recipe!r}; known: {', '.join(RECIPES)}")
        recipe = dict(RECIPES[args.recipe or "default"])
        if args.init_from and not args.recipe:  # the tuned recipe is for training from scratch; fine-tunes: AdamW
            recipe = {"preset": recipe["preset"]}
        if train_over.get("fsdp") and recipe.get("optimizer") == "muon":  # Muon needs whole matrices: not sharded
            recipe["optimizer"] = "adamw"
        preset = recipe.pop("preset")
        preset = args.preset or preset
        if args.init_from:
            mcfg = init_config(args.init_from, model_over, args.preset or args.config)
        else:
            mcfg = ModelConfig.load(args.config) if args.config else ModelConfig.from_name(preset)
            mcfg = mcfg.replace(**model_over) if model_over else mcfg
            # A preset's vocabulary is the data's tokenizer's (a config file or --vocab-size says otherwise).
            vocab_from_data = not args.config and "vocab_size" not in model_over
        tcfg = TrainConfig(data=args.data, out=args.out, **(recipe | train_over))
        if Path(args.out, "latest").exists():  # a run that never saved a checkpoint may start again
            raise TinyMixtralError(f"{args.out} already holds a run; use --resume {args.out} or another --out")
    _check(tcfg)
    if vocab_from_data:
        mcfg = mcfg.replace(vocab_size=load_split(tcfg.data, "train")[1]["vocab_size"])
    final = T.train(tcfg, mcfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", 0)) == 0:
        nan = float("nan")
        print(f"done: step {final.get('step')}, val loss {final.get('final_val_loss', nan):.4f}, "
              f"val bpb {final.get('final_val_bpb', nan):.4f} (the whole val split, {final.get('val_tokens', 0):,} "
              f"tokens); checkpoints in {tcfg.out}/checkpoints")
    return 0


def init_config(model_dir: str, model_over: dict, other) -> ModelConfig:
    """The config of an --init-from model directory, with the routing options the flags change."""
    if other:
        raise TinyMixtralError("--init-from takes the model's config: drop --preset / --config")
    path = Path(model_dir)
    cfg = model_config(path)
    if path.is_dir() and not (path / "params.json").is_file():
        weight_files(path)  # a directory without weights: one line now, not after the data are read
    if cfg.quantization:
        raise TinyMixtralError(f"{model_dir} is quantized ({cfg.quantization['bits']}-bit): train from the "
                               "full-precision model")
    fixed = sorted(k for k in model_over if k not in ROUTING_OPTIONS)
    if fixed:
        allowed = ", ".join("--" + k.replace("_", "-") for k in ROUTING_OPTIONS)
        raise TinyMixtralError(f"--{fixed[0].replace('_', '-')} cannot change with --init-from: the model's "
                               f"config and weights are kept (only routing options may change: {allowed})")
    if not cfg.is_moe and model_over:
        raise TinyMixtralError(f"{model_dir} is a dense model: it has no router for --"
                               f"{next(iter(model_over)).replace('_', '-')}")
    return cfg.replace(**model_over) if model_over else cfg


def _check(t: TrainConfig):
    """Every numeric training flag in its range and finite (NaN would slip past a plain `x <= 0` check)."""
    for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_interval", "log_interval",
                 "ckpt_interval", "eval_batches"):
        if getattr(t, name) is not None and getattr(t, name) < 1:  # max_steps None: no step limit
            raise TinyMixtralError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(t, name)}")
    for name in ("batch_size", "seq_len", "grad_accum"):  # tensor sizes: torch overflows past MAX_SIZE
        if getattr(t, name) > MAX_SIZE:
            raise TinyMixtralError(f"--{name.replace('_', '-')} must be at most {MAX_SIZE:,}, got {getattr(t, name)}")
    for name in ("warmup_steps", "keep_last", "skip_nonfinite"):
        if getattr(t, name) < 0:
            raise TinyMixtralError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(t, name)}")
    if t.router_lr is not None and not (math.isfinite(t.router_lr) and t.router_lr > 0):
        raise TinyMixtralError(f"--router-lr must be > 0 and finite, got {t.router_lr}")
    ranges = {"lr": ("> 0", lambda v: v > 0), "muon_lr": ("> 0", lambda v: v > 0),
              "decay_fraction": ("in [0, 1]", lambda v: 0 <= v <= 1), "grad_clip": ("> 0", lambda v: v > 0),
              "weight_decay": (">= 0", lambda v: v >= 0), "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
              "dropout": ("in [0, 1)", lambda v: 0 <= v < 1), "dropout_after": (">= 0", lambda v: v >= 0),
              "ffn_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
              "beta1": ("in [0, 1)", lambda v: 0 <= v < 1), "beta2": ("in [0, 1)", lambda v: 0 <= v < 1)}
    for name, (what, ok) in ranges.items():
        v = getattr(t, name)
        if not (math.isfinite(v) and ok(v)):
            raise TinyMixtralError(f"--{name.replace('_', '-')} must be {what} and finite, got {v}")
    if not -2**63 <= t.seed < 2**64:  # what torch.manual_seed takes
        raise TinyMixtralError(f"--seed must be an integer of at most 64 bits, got {t.seed}")
    if t.max_tokens is not None and t.max_tokens < 1:
        raise TinyMixtralError(f"--max-tokens must be >= 1, got {t.max_tokens}")
    if t.max_time is not None and not (0 < t.max_time < math.inf):
        raise TinyMixtralError(f"--max-time must be a positive duration, got {t.max_time}")
    if t.optimizer not in ("adamw", "muon"):
        raise TinyMixtralError(f"--optimizer must be adamw or muon, got {t.optimizer!r}")
    if t.schedule not in ("cosine", "wsd"):
        raise TinyMixtralError(f"--schedule must be cosine or wsd, got {t.schedule!r}")
    if t.train_only not in ("router", "experts", "attention", "all"):
        raise TinyMixtralError(f"--train-only must be router, experts, attention or all, got {t.train_only!r}")
    if t.autocast not in ("none", "bf16", "fp16", "auto"):
        raise TinyMixtralError(f"--autocast must be none, bf16, fp16 or auto, got {t.autocast!r}")


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise TinyMixtralError(f"--max-time must look like 600, 10m or 1h, got {text!r}") from None
