"""`tinymixtral plot`: PNG plots of a training run."""

from __future__ import annotations

from ..plots import plot_run


def add_arguments(p):
    p.add_argument("run_dir", help="a training run directory")


def run(args) -> int:
    for path in plot_run(args.run_dir):
        print(path)
    return 0
