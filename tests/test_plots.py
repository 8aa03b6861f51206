"""Training plots (`tinymixtral plot`): the PNGs a run writes, and the command that redraws them."""
import shutil

from conftest import PNG
from tinymixtral import cli


def test_pngs_and_plot_cli(trained, tmp_path, capsys):
    out, _, _ = trained
    for name in ("loss.png", "expert_load.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "metrics.jsonl", copy / "metrics.jsonl")
    assert cli.main(["plot", str(copy)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(copy / "loss.png"), str(copy / "expert_load.png")]
    for name in ("loss.png", "expert_load.png"):
        assert (copy / name).read_bytes().startswith(PNG) and (copy / name).stat().st_size > 1000
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
