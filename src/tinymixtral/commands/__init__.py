"""The command line: one module per `tinymixtral` command, each with add_arguments(p) and run(args).

Commands parse flags, call the library (the modules above this package) and print; the library never
imports them. `cli.py` is the table of commands.
"""

import argparse

import torch

from ..errors import TinyMixtralError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seed(text: str) -> int:
    """An argparse type: a --seed torch accepts (an integer that fits 64 bits)."""
    try:
        value = int(text)
        torch.Generator().manual_seed(value)
    except (ValueError, RuntimeError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected an integer of at most 64 bits, got {text!r}") from None
    return value


def add_load_options(p):
    """--dtype / --bits / --group-size: how a model directory is loaded (commands that read one)."""
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast the weights while loading (default: fp32 for eval and routes, as stored for generate)")
    p.add_argument("--bits", type=int, choices=(8, 4), default=None,
                   help="quantize the weights while loading: int8 per channel or int4 in groups (weight-only)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 or 256 (default 32)")


def load_options(args, default_dtype: torch.dtype | None = None) -> dict:
    """load_model's keyword arguments from the flags of add_load_options."""
    if args.group_size is not None and args.bits != 4:
        raise TinyMixtralError("--group-size is for --bits 4 only")
    return {"dtype": DTYPES[args.dtype] if args.dtype else default_dtype, "bits": args.bits,
            "group_size": args.group_size}


def compile_mode(text: str) -> bool | str:
    """An argparse type: --compile auto|true|false."""
    if text.lower() == "auto":
        return "auto"
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")


def add_compile_option(p):
    """--compile [auto|true|false] / --no-compile: the decode step through torch.compile (generate, chat)."""
    from ..generation import AUTO_COMPILE_TOKENS
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", type=compile_mode, nargs="?", const=True, default="auto", metavar="auto|true|false",
                   help="decode through torch.compile: ~1.5-2x faster per token on a CPU after ~10 s of compiling "
                        f"(a minute or more the first time). auto (default): from {AUTO_COMPILE_TOKENS} new tokens, unquantized "
                        "models, on a CPU or CUDA; eager with a warning if compiling fails. --compile alone: true. "
                        "On a CPU with our kernels an fp32/int8/int4 model decodes through one C++ op a step "
                        "instead, faster, and nothing compiles")
    g.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="= --compile false")
