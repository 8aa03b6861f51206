"""`tinymixtral <command>`: a table of subcommands, each a module of commands/ with add_arguments(p) and run(args).

Modules are imported only for the command that runs, so `tinymixtral --help` stays fast.
Errors of the project's own type end with one line on stderr and exit status 2 (`--debug` shows
the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import TinyMixtralError

COMMANDS = {
    "params": ("tinymixtral.commands.params", "parameter count, active parameters and memory of a model"),
    "prepare": ("tinymixtral.commands.prepare", "tokenize a text source into train/val shards"),
    "train": ("tinymixtral.commands.train", "train a model, or resume a run"),
    "eval": ("tinymixtral.commands.eval", "loss, perplexity and bits per byte of a model on a data split"),
    "generate": ("tinymixtral.commands.generate", "generate text from a prompt"),
    "chat": ("tinymixtral.commands.chat", "interactive multi-turn chat with a model"),
    "quantize": ("tinymixtral.commands.quantize", "int8 / int4 weight-only quantized model directory"),
    "plot": ("tinymixtral.commands.plot", "PNG plots of a training run"),
    "bench": ("tinymixtral.commands.bench", "training, prefill and decode speed vs transformers"),
    "routes": ("tinymixtral.commands.routes", "router statistics and pictures for a model on some text"),
    "upcycle": ("tinymixtral.commands.upcycle", "a Mixtral whose experts start as copies of a dense model's FFN"),
    "merge": ("tinymixtral.commands.merge", "an MoE from dense models (mergekit-moe YAML)"),
    "convert": ("tinymixtral.commands.convert", "convert between HF and Mistral-native formats"),
    "export": ("tinymixtral.commands.export", "a GGUF file that llama.cpp runs token for token"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinymixtral", description="A small, fast, hackable Mixtral.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
        if name == command:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except TinyMixtralError as e:
        if args.debug:
            raise
        print(f"tinymixtral {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinymixtral {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
