"""The package's import graph, read from the code with ast (imports inside functions included):
no cycles, model/ below everything but config and errors, the library never importing commands/, and
build.py the only place that constructs a Transformer."""

from __future__ import annotations

import ast
from pathlib import Path

import tinymixtral

ROOT = Path(tinymixtral.__file__).parent
PKG = "tinymixtral"


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = [PKG, *f.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (a `from pkg import mod` counts as importing pkg.mod)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            found.add(stem)
            found.update(f"{stem}.{a.name}" for a in node.names)
    # the top-level package only re-exports lazily (__getattr__): importing it is not importing its modules
    return {m for m in found if m in known and m not in (name, PKG)}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, f, set(mods)) for m, f in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                cycle = visit(d, path + [d])
                if cycle:
                    return cycle
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            cycle = visit(m, [m])
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_model_imports_only_config_and_errors():
    allowed = {f"{PKG}.config", f"{PKG}.errors"}
    for m, deps in graph().items():
        if m.startswith(f"{PKG}.model"):
            bad = {d for d in deps if not d.startswith(f"{PKG}.model") and d not in allowed}
            assert not bad, f"{m} imports {sorted(bad)}: model/ may import only model/, config and errors"


def test_library_never_imports_commands():
    top = {f"{PKG}.cli", f"{PKG}.__main__"}
    for m, deps in graph().items():
        if not m.startswith(f"{PKG}.commands") and m not in top:
            bad = {d for d in deps if d.startswith(f"{PKG}.commands")}
            assert not bad, f"library module {m} imports {sorted(bad)}"


def test_every_command_is_a_commands_module():
    from tinymixtral.cli import COMMANDS

    mods = modules()
    for name, (module, _) in COMMANDS.items():
        assert module.startswith(f"{PKG}.commands.") and module in mods, f"command {name} -> {module}"
    # and no module outside commands/ defines a command's entry points
    for m, f in mods.items():
        if not m.startswith(f"{PKG}.commands"):
            defs = {n.name for n in ast.parse(f.read_text()).body if isinstance(n, ast.FunctionDef)}
            assert not {"add_arguments", "run"} <= defs, f"{m} holds command code (add_arguments/run)"


def test_only_build_constructs_a_transformer():
    """One way to build a model: a Transformer(...) call appears in build.py alone."""
    callers = []
    for m, f in modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Transformer":
                callers.append(m)
    assert callers and set(callers) == {f"{PKG}.build"}, callers


def test_model_files_stay_short():
    for f in (ROOT / "model").glob("*.py"):
        n = len(f.read_text().splitlines())
        assert n <= 250, f"{f.name} has {n} lines; split it along a concept boundary"
