"""The `tinymixtral` command line itself: the command table, help of every command, and the package's exports.
(Each command's own tests are in its module's test file: test_params, test_train, test_generation, ...)"""
import importlib

import pytest
import torch

import tinymixtral
from conftest import GEN, run_cli, tiny_model
from tinymixtral import cli
from tinymixtral.generation import generate, stream
from tinymixtral.merging import merge
from tinymixtral.upcycling import upcycle


# ---- the command table and help ---------------------------------------------------------------------
def test_top_level_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for name, (_, help_text) in cli.COMMANDS.items():
        assert name in r.stdout and help_text in r.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_a_module_and_help(name, capsys):
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(module.add_arguments) and callable(module.run)
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tinymixtral {name}") and "--debug" in out


# ---- the package's exports stay the functions after the CLI imported their modules ---------------------
def test_package_exports_the_functions():
    """`tinymixtral.generate` is the function even after the CLI imported the module that holds it."""
    import tinymixtral.cli  # noqa: F401
    import tinymixtral.generation  # noqa: F401

    assert tinymixtral.generate is generate and tinymixtral.stream is stream
    model = tiny_model(GEN, sliding_window=8, vary_norms=True)
    assert tinymixtral.generate(model, torch.tensor([[1, 2]]), 3).shape == (1, 5)


def test_exports_are_the_functions_even_after_the_cli_imported_their_modules():
    cli.build_parser("upcycle"), cli.build_parser("merge")
    assert tinymixtral.upcycle is upcycle and tinymixtral.merge is merge
    from tinymixtral.analysis.stats import routing_stats

    assert tinymixtral.routing_stats is routing_stats
