"""benchmarks/recipe_search.py: recipes in, one result line per run, and the table of means and spreads."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tinymixtral.errors import TinyMixtralError

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # moe_vs_dense imports recipe_search by name
    spec.loader.exec_module(module)
    return module


rs = _load("recipe_search")

TINY = dict(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4, top_k=2, max_seq_len=64,
            batch_size=4, seq_len=32, warmup_steps=2)


def test_recipes_from_json_and_py_with_names_and_checked_keys(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([{"name": "today", "preset": "demo", "lr": 4e-3},
                                                 {"optimizer": "muon", "muon_lr": 0.02}]))
    recipes = rs.load_recipes(tmp_path / "r.json")
    assert [r["name"] for r in recipes] == ["today", "optimizer=muon,muon_lr=0.02"]
    (tmp_path / "r.py").write_text("RECIPES = [dict(name='wide', d_model=384, n_experts=0)]\n")
    assert rs.load_recipes(tmp_path / "r.py") == [{"name": "wide", "d_model": 384, "n_experts": 0}]
    for bad, message in [([{"lr": 1, "learning_rate": 2}], "unknown recipe key 'learning_rate'"),
                         ([{"max_time": 60}], "set by the search"),
                         ([{"name": "a"}, {"name": "a", "lr": 1}], "two recipes are named 'a'"),
                         ({"lr": 1}, "non-empty list of dicts")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(TinyMixtralError, match=message):
            rs.load_recipes(tmp_path / "bad.json")


def test_train_flags_quiet_the_run_unless_the_recipe_says_otherwise():
    flags = rs.train_flags({"name": "x", "data": "D", "recipe": "demo", "lr": 0.004, "tie_embeddings": False})
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs == {"--eval-interval": str(10**9), "--ckpt-interval": str(10**9), "--log-interval": "50",
                     "--recipe": "demo", "--lr": "0.004", "--tie-embeddings": "false"}
    assert dict(zip(*[iter(rs.train_flags({"eval_interval": 100}))] * 2))["--eval-interval"] == "100"
    assert rs.parse_seeds("3") == [1, 2, 3] and rs.parse_seeds("4,9") == [4, 9]
    with pytest.raises(TinyMixtralError, match="--seeds"):
        rs.parse_seeds("three")


def _row(name, seed, bpb, steps=100, tps=1000.0):
    return {"name": name, "seed": seed, "minutes": 8.0, "data": "D", "recipe": {}, "val_bpb": bpb, "steps": steps,
            "tokens_per_s": tps, "total_params": 7_000_000, "active_params": 4_000_000}


def test_summary_means_spreads_and_the_relative_difference():
    rows = [_row("today", 1, 2.0), _row("today", 2, 2.2), _row("muon", 1, 1.8, steps=90), _row("muon", 2, 1.9),
            _row("solo", 1, 2.5), {"name": "broken", "seed": 1, "minutes": 8.0, "data": "D", "error": "train: boom"}]
    s = rs.summarize(rows)
    assert [x["name"] for x in s] == ["muon", "today", "solo"]  # best first
    muon, today = s[0], s[1]
    assert muon["mean"] == pytest.approx(1.85) and muon["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert (muon["min"], muon["max"], muon["steps"]) == (1.8, 1.9, 95)
    assert today["baseline"] and muon["rel"] == pytest.approx(1.85 / 2.1 - 1) and s[2]["sd"] == 0.0
    assert rs.summarize(rows, baseline="muon")[1]["rel"] == pytest.approx(2.1 / 1.85 - 1)
    md = rs.table(rows).splitlines()
    assert md[0].startswith("| recipe | seeds | val bpb mean | sd |") and len(md) == 2 + 3 + 2
    assert md[2].startswith("| muon | 2 | 1.8500 | 0.0707 | 1.8000 - 1.9000 | -11.9% | 95 | 1,000 | 7.00M (4.00M) |")
    assert "| baseline |" in md[3] and md[-1] == "failed: broken seed 1: train: boom"


def test_results_file_survives_a_cut_line(tmp_path):
    out = tmp_path / "r.jsonl"
    rs.append_result(out, _row("a", 1, 2.0))
    with open(out, "a") as f:
        f.write('{"name": "b", "se')  # a kill in the middle of a write
    assert rs.read_results(out) == [_row("a", 1, 2.0)]
    assert rs.done_keys(rs.read_results(out)) == {rs.run_key("a", 1, 8.0, "D", {"name": "a"})}
    assert rs.run_key("a", 1, 8.0, "D", {"lr": 1}) != rs.run_key("a", 1, 8.0, "D", {"lr": 2})  # values count


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert rs.main(["--data", "D", "--recipes", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"recipe_search: error: recipes file not found: {tmp_path / 'none.json'}"]
    assert rs.main(["--report", "--out", str(tmp_path / "none.jsonl")]) == 2


@pytest.mark.slow
def test_a_short_search_writes_a_row_per_run_and_skips_done_ones(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipes = tmp_path / "r.json"
    recipes.write_text(json.dumps([{"name": "tiny", "preset": "demo", **TINY},
                                   {"name": "bad", "preset": "demo", **TINY, "n_heads": 5}]))
    out = tmp_path / "results.jsonl"
    argv = ["--data", str(data_dir), "--recipes", str(recipes), "--minutes", "0.005", "--seeds", "1",
            "--out", str(out), "--eval-seq-len", "16", "--keep", str(tmp_path / "runs")]
    assert rs.main(argv) == 0
    rows = rs.read_results(out)
    assert [r["name"] for r in rows] == ["tiny", "bad"]
    tiny, bad = rows
    meta = json.loads((data_dir / "meta.json").read_text())
    assert tiny["vocab_size"] == meta["vocab_size"]  # the data fix the vocabulary
    assert tiny["steps"] >= 1 and tiny["tokens"] == tiny["steps"] * 4 * 32 and tiny["tokens_per_s"] > 0
    assert tiny["active_params"] < tiny["total_params"] and tiny["eval_seq_len"] == 16
    assert 0 < tiny["val_bpb"] < 20 and tiny["wall_s"] >= tiny["wall_train_s"] > 0
    # the eval reads the whole val split of the run's final model: the same number `tinymixtral eval` gives
    from tinymixtral.evaluate import eval_model
    ev = eval_model(str(tmp_path / "runs" / "tiny-seed1" / "latest"), str(data_dir), seq_len=16)
    assert tiny["val_bpb"] == pytest.approx(ev["bpb"], rel=1e-6) and tiny["val_tokens"] == ev["tokens"]
    assert tiny["train_val_bpb"] != tiny["val_bpb"]  # the run's own pass used windows of 32
    assert bad["error"].startswith("train: tinymixtral train: error:") and "n_heads" in bad["error"]
    assert "| tiny | 1 |" in capsys.readouterr().out
    recipes.write_text(json.dumps([{"name": "tiny", "preset": "demo", **TINY}]))
    assert rs.main(argv) == 0  # again: the finished run is skipped (a failed one would be tried again)
    assert len(rs.read_results(out)) == 2 and "already holds 1 of these runs" in capsys.readouterr().err


# ---- benchmarks/moe_vs_dense.py: the twins go through recipe_search's runner ------------------------------------
mvd = _load("moe_vs_dense")


def test_the_dense_twin_has_the_moes_active_ffn():
    from tinymixtral.config import ModelConfig
    from tinymixtral.params import count_params

    moe, dense = mvd.twin_recipes("demo", {})
    assert moe == {"name": "moe", "preset": "demo", "recipe": "demo"}
    assert dense == moe | {"name": "dense", "n_experts": 0, "d_ff": 1024}  # demo: top-2 of 512
    moe, dense = mvd.twin_recipes("demo", mvd.parse_flags(["--n-experts", "8", "--top-k", "4", "--d-ff", "128",
                                                           "--optimizer", "muon"]))
    assert dense["d_ff"] == 512 and dense["optimizer"] == moe["optimizer"] == "muon" and moe["n_experts"] == "8"
    cfg = ModelConfig.from_name("demo")
    a = count_params(cfg)["components"]
    b = count_params(cfg.replace(n_experts=0, d_ff=1024))["components"]
    assert a["experts"]["active"] == b["ffn"]["active"]  # the twins touch the same FFN weights per token
    with pytest.raises(TinyMixtralError, match="--flag value pairs"):
        mvd.parse_flags(["--lr"])
    with pytest.raises(TinyMixtralError, match="set by the search"):
        mvd.twin_recipes("demo", {"seed": "3"})


def test_moe_vs_dense_reports_means_spreads_and_the_paired_difference(tmp_path, monkeypatch, capsys):
    bpb = {("moe", 1): 2.0, ("dense", 1): 2.1, ("moe", 2): 1.9, ("dense", 2): 2.1}
    calls = []

    def fake_run(recipe, seed, minutes, data, work, eval_seq_len=256, keep=False):
        calls.append((recipe["name"], seed, recipe.get("lr")))
        return {"name": recipe["name"], "seed": seed, "minutes": minutes, "data": data,
                "recipe": {k: v for k, v in recipe.items() if k != "name"}, "val_bpb": bpb[recipe["name"], seed],
                "steps": 10, "tokens_per_s": 100.0, "total_params": 2, "active_params": 1}

    monkeypatch.setattr(mvd.rs, "run_recipe", fake_run)
    argv = ["--data", "D", "--seeds", "2", "--minutes", "1", "--out", str(tmp_path / "r.jsonl"),
            "--summary", str(tmp_path / "s.json"), "--lr", "3e-3"]
    assert mvd.main(argv) == 0
    assert calls == [("moe", 1, "3e-3"), ("dense", 1, "3e-3"), ("moe", 2, "3e-3"), ("dense", 2, "3e-3")]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["rel"] == pytest.approx(1.95 / 2.1 - 1)
    assert s["paired"] == pytest.approx([2.0 / 2.1 - 1, 1.9 / 2.1 - 1])
    out = capsys.readouterr().out
    assert "moe    val bpb 1.9500 ± 0.0707 (n=2" in out and "MoE vs dense: -7.14% (means)" in out
    assert mvd.main(argv) == 0 and len(calls) == 4  # done runs are not run again
    assert mvd.main(["--data", "D", "--seeds", "1", "--lr"]) == 2
