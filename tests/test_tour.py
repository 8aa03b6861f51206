"""docs/TOUR.md stays true: its excerpts are the code as it is, its functions exist, its pictures are there,
and every command in it runs (on tiny settings)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
from conftest import PNG

ROOT = Path(__file__).resolve().parent.parent


def _build_tour():
    spec = importlib.util.spec_from_file_location("build_tour", ROOT / "docs" / "build_tour.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bt = _build_tour()
SRC = bt.SRC.read_text()


def test_tour_is_built_from_the_current_code():
    """TOUR.md == the source with today's excerpts and the recorded outputs: an edited quoted function, or a
    source edited without a rebuild, fails here (fix: python docs/build_tour.py --quote)."""
    import json

    outputs = json.loads(bt.OUTPUTS.read_text())
    assert bt.render(SRC, outputs) == bt.OUT.read_text(), "docs/TOUR.md is stale: run python docs/build_tour.py --quote"
    runs = [arg for kind, arg in bt.markers(SRC) if kind == "run"]
    assert set(runs) == set(outputs), "commands without a recorded output, or outputs of removed commands"


def test_every_idea_has_formula_code_and_command():
    """Each of the 11 numbered sections quotes code and shows a command or a picture."""
    sections = SRC.split("\n## ")[1:]
    numbered = [s for s in sections if re.match(r"\d+\. ", s)]
    assert len(numbered) == 11
    for s in numbered:
        assert "<!-- excerpt:" in s, s.splitlines()[0]
        assert "<!-- run:" in s or "<!-- picture:" in s, s.splitlines()[0]


def test_excerpts_are_short_and_found_by_name():
    for kind, arg in bt.markers(SRC):
        if kind == "excerpt":
            _, _, lines = bt.excerpt_lines(arg)
            assert 3 <= len(lines) <= 25, (arg, len(lines))


def test_a_missing_or_changed_function_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("class A:\n    def f(self):\n        x = 1\n        return x\n\nK = {'a': 1}\n")
    monkeypatch.setattr(bt, "ROOT", tmp_path)
    assert bt.excerpt_lines("m.py::A.f")[2] == ["def f(self):", "    x = 1", "    return x"]
    assert bt.excerpt_lines('m.py::A.f "x = 1" .. "return"')[2] == ["x = 1", "return x"]
    assert bt.excerpt_lines("m.py::K")[2] == ["K = {'a': 1}"]
    before = bt.render_excerpt("m.py::A.f")
    (tmp_path / "m.py").write_text("class A:\n    def f(self):\n        return 2\n")
    assert bt.render_excerpt("m.py::A.f") != before  # so the built TOUR.md no longer matches
    for spec, message in [("m.py::A.g", "no function, class or assignment named 'A.g'"),
                          ("m.py::B", "named 'B'"), ("gone.py::A", "no file gone.py"),
                          ('m.py::A.f "x = 1" .. "return"', "has no line with 'x = 1'")]:
        with pytest.raises(bt.TourError, match=message):
            bt.excerpt_lines(spec)


def test_filters_and_tiny_settings():
    argv, filters = bt.split_pipes("tinymixtral params --preset demo | grep -E 'KV|window' | head -n 1")
    assert argv == ["tinymixtral", "params", "--preset", "demo"]
    assert bt.filtered("a\nKV 1\nwindow 2\n", filters) == "KV 1"
    assert bt.clean("x\r 50%\r100% done  \n") == "100% done"
    with pytest.raises(bt.TourError, match="only"):
        bt.split_pipes("tinymixtral params | sort")
    assert bt.tiny("tinymixtral train --max-time 45s --data d") == "tinymixtral train --max-steps 3 --data d"


def test_pictures_exist_and_the_readme_links_the_tour():
    for kind, arg in bt.markers(SRC):
        if kind == "picture":
            png = ROOT / "docs" / f"tour_{arg}.png"
            assert png.read_bytes()[:8] == PNG, png
            assert f"](tour_{arg}.png)" in bt.OUT.read_text()
    assert "docs/TOUR.md" in "\n".join((ROOT / "README.md").read_text().splitlines()[:30])


@pytest.mark.slow
def test_every_command_of_the_tour_runs_on_tiny_settings(tmp_path):
    """The tour's commands in order, shortened (bt.TINY), in a scratch directory; pictures drawn there too."""
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "tour_merge.yaml", tmp_path / "docs")
    outputs = bt.run_all(SRC, tmp_path, tmp_path / "docs", make_tiny=True, log=lambda *a: None)
    assert set(outputs) == {arg for kind, arg in bt.markers(SRC) if kind == "run"}
    for kind, arg in bt.markers(SRC):
        if kind == "picture":
            assert (tmp_path / "docs" / f"tour_{arg}.png").read_bytes()[:8] == PNG
    assert (tmp_path / "tour" / "aux-q8.gguf").is_file() and (tmp_path / "tour" / "merged" / "config.json").is_file()
