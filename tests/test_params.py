"""Parameter and memory accounting (`tinymixtral params`): totals, active parameters, weights, KV cache and
training memory, on presets, real models and saved model directories, and bad input."""

import json

import pytest

from conftest import assert_one_line_error, call_cli, run_cli
from tinymixtral import Transformer, cli
from tinymixtral.config import PRESETS, ModelConfig


def params_json(capsys, *args) -> dict:
    assert cli.main(["params", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- params -----------------------------------------------------------------------------------------
def test_params_mixtral_8x7b(capsys):
    r = params_json(capsys, "--preset", "mixtral-8x7b")
    assert r["total"] == 46_702_792_704
    assert r["active"] == pytest.approx(12.88e9, rel=0.005)
    w = r["weights_bytes"]
    assert w["fp32"] == 4 * r["total"] and w["bf16"] == 2 * r["total"]
    assert w["bf16"] == pytest.approx(93.4e9, rel=1e-3)
    assert w["int8"] == pytest.approx(46.7e9, rel=1e-3)
    assert w["int4"] == pytest.approx(23.35e9, rel=1e-3)
    assert r["config"]["num_local_experts"] == 8 and r["config"]["hidden_size"] == 4096
    assert sum(c["total"] for c in r["components"].values()) == r["total"]
    assert sum(c["active"] for c in r["components"].values()) == r["active"]
    kv = r["kv_cache_bytes"]  # no sliding window: the rolling cache is the full one
    assert kv["window"] is None and kv["rolling"] == kv["full"] and kv["context"] == 32768
    assert kv["full"]["bf16"] == 2 * 32 * 8 * 128 * 32768 * 1 * 2


def test_params_tiny_mixtral_matches_a_real_model(capsys):
    r = params_json(capsys, "--preset", "tiny-mixtral")
    assert r["total"] == 239_378_944 and r["active"] == 88_384_000
    cfg = ModelConfig.from_name("tiny-mixtral")
    model = Transformer(cfg)  # real tensors, not the meta device the command uses
    named = dict(model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == r["total"]
    experts = sum(p.numel() for n, p in named.items() if ".ffn.experts." in n)
    assert experts == r["components"]["experts"]["total"]
    assert r["active"] == r["total"] - experts + experts * cfg.top_k // cfg.n_experts
    assert r["training_bytes"]["total"] == 16 * r["total"]


@pytest.mark.parametrize("context,batch", [(1024, 2), (100, 3)])
def test_params_kv_cache_bytes(capsys, context, batch):
    cfg = ModelConfig.from_name("tiny-mixtral")
    r = params_json(capsys, "--preset", "tiny-mixtral", "--context", str(context), "--batch", str(batch))
    kv = r["kv_cache_bytes"]
    assert (kv["context"], kv["batch"], kv["window"]) == (context, batch, cfg.sliding_window)
    per = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        assert kv["full"][dtype] == per * context * batch * size
        assert kv["rolling"][dtype] == per * min(context, cfg.sliding_window) * batch * size


def test_params_text_report(capsys):
    assert cli.main(["params", "--preset", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "KV cache" in out and "experts hold" in out


def test_params_unknown_preset_exit_2():
    line = assert_one_line_error(run_cli("params", "--preset", "nope"), "params", 2)
    assert "'nope'" in line and all(name in line for name in PRESETS)


@pytest.mark.parametrize("argv,message", [
    (["params", "--preset", "demo", "--context", "0"], "--context must be positive"),
    (["params", "--preset", "demo", "--batch", "-1"], "--batch must be positive"),
    (["params", "--model", "/nonexistent/model"], "model directory not found"),
])
def test_params_bad_input(capsys, argv, message):
    assert message in assert_one_line_error(call_cli(capsys, *argv), "params", 2)


# ---- on model directories, in a subprocess -----------------------------------------------------
def test_cli_params_missing_model_dir(tmp_path):
    line = assert_one_line_error(run_cli("params", "--model", str(tmp_path / "nope")), "params")
    assert "nope" in line


def test_cli_params_config_of_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    line = assert_one_line_error(run_cli("params", "--config", str(tmp_path / "config.json")), "params")
    assert "llama" in line


def test_cli_params_on_a_saved_model(saved):
    path, model = saved
    proc = run_cli("params", "--model", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"] == model.num_params()
