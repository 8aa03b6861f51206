"""The `tinymixtral` command line: the command table, help, params, generate, errors and train overrides."""
import argparse
import dataclasses
import importlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import tinymixtral.train as T
from tinymixtral import cli
from tinymixtral.config import PRESETS, ModelConfig
from tinymixtral.train import TrainConfig


def tm(*args, timeout=120):
    """`python -m tinymixtral ARGS` in a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tinymixtral", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_error_line(stderr: str, command: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"tinymixtral {command}: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def params_json(capsys, *args) -> dict:
    assert cli.main(["params", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- the command table and help ---------------------------------------------------------------------
def test_top_level_help_lists_every_command():
    r = tm("--help")
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
    from tinymixtral import Transformer

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
    r = tm("params", "--preset", "nope")
    assert r.returncode == 2
    line = one_error_line(r.stderr, "params")
    assert "'nope'" in line and all(name in line for name in PRESETS)


@pytest.mark.parametrize("argv,message", [
    (["params", "--preset", "demo", "--context", "0"], "--context must be positive"),
    (["params", "--preset", "demo", "--batch", "-1"], "--batch must be positive"),
    (["params", "--model", "/nonexistent/model"], "model directory not found"),
])
def test_params_bad_input(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err, "params")


# ---- train errors and overrides ---------------------------------------------------------------------
def test_train_without_data_exit_2():
    r = tm("train", "--out", "somewhere")
    assert r.returncode == 2
    assert "--data" in one_error_line(r.stderr, "train")


def _train_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser("train")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_config_field_has_exactly_one_flag():
    p = _train_parser()
    actions = [a for a in p._actions if a.option_strings]
    flags = [s for a in actions for s in a.option_strings]
    assert len(flags) == len(set(flags))  # no collisions
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not train_fields & model_fields
    for name in train_fields | model_fields:
        mine = [a for a in actions if a.dest == name]
        assert len(mine) == 1, name
        assert mine[0].option_strings == ["--" + name.replace("_", "-")], name
    help_text = p.format_help()
    assert "training (TrainConfig fields)" in help_text and "model overrides (ModelConfig fields)" in help_text


TRAIN_VALUES = dict(batch_size=3, seq_len=17, grad_accum=2, lr=0.005, min_lr_ratio=0.2, warmup_steps=7,
                    max_steps=11, max_tokens=1000, max_time="10m", weight_decay=0.2, beta1=0.8, beta2=0.9,
                    grad_clip=0.5, eval_interval=5, eval_batches=3, log_interval=2, ckpt_interval=9, keep_last=4,
                    seed=99, device="cpu", autocast="bf16", compile=True, wandb=True, wandb_project="proj",
                    fsdp=True, progress=False)
MODEL_VALUES = dict(vocab_size=320, d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, head_dim=16, d_ff=96,
                    n_experts=5, top_k=3, sliding_window=24, max_seq_len=96, rope_theta=5e4, norm_eps=1e-6,
                    tie_embeddings=False, init_std=0.03, bos_token_id=5, eos_token_id=6, pad_token_id=7,
                    router_aux_loss_coef=0.02, router_z_loss_coef=0.001, router_jitter_noise=0.05,
                    noisy_gating=True, capacity_factor=1.5)


def _flag_args(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    return out


@pytest.fixture
def fake_train(monkeypatch):
    seen = {}

    def fake(tcfg, mcfg, resume=False):
        seen.update(tcfg=tcfg, mcfg=mcfg, resume=resume)
        return {"step": 0}

    monkeypatch.setattr(T, "train", fake)
    return seen


def test_every_flag_reaches_its_config_field(tmp_path, fake_train, capsys):
    argv = ["train", "--data", "D", "--out", str(tmp_path / "run"), *_flag_args(TRAIN_VALUES),
            *_flag_args(MODEL_VALUES)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    tcfg, mcfg = fake_train["tcfg"], fake_train["mcfg"]
    assert fake_train["resume"] is False and tcfg.data == "D" and tcfg.out == str(tmp_path / "run")
    for k, v in TRAIN_VALUES.items():
        assert getattr(tcfg, k) == (600.0 if k == "max_time" else v), k
    for k, v in MODEL_VALUES.items():
        assert getattr(mcfg, k) == v, k
    demo = ModelConfig.from_name("demo")
    # the values differ from the defaults, so each one shows its flag arrived
    assert all(getattr(demo, k) != v for k, v in MODEL_VALUES.items())
    assert all(getattr(TrainConfig(), k) != v for k, v in TRAIN_VALUES.items())
    # untouched fields keep the preset's values
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "r2"), "--d-model", "64"]) == 0
    assert fake_train["mcfg"] == demo.replace(d_model=64) and fake_train["tcfg"] == TrainConfig(
        data="D", out=str(tmp_path / "r2"))


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--autocast", "fp8"], "--autocast must be none, bf16 or fp16"),
    (["--max-time", "soon"], "--max-time must look like"),
    (["--n-heads", "5"], "n_heads"),
    (["--preset", "nope"], "unknown preset"),
])
def test_train_bad_flags_exit_2(tmp_path, fake_train, capsys, argv, message):
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in one_error_line(capsys.readouterr().err, "train")
    assert not fake_train


@pytest.mark.parametrize("argv,message", [
    (["--fsdp", "maybe"], "argument --fsdp: expected true or false, got 'maybe'"),
    (["--tie-embeddings", "2"], "argument --tie-embeddings: expected true or false, got '2'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
])
def test_train_unparsable_flag_values_are_usage_errors(tmp_path, fake_train, capsys, argv, message):
    with pytest.raises(SystemExit) as e:  # argparse's own error: usage, then one error line, exit 2
        cli.main(["train", "--data", "D", "--out", str(tmp_path / "run"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tinymixtral train") and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"tinymixtral train: error: {message}"
    assert not fake_train


def test_train_resume_rules(tmp_path, fake_train, capsys):
    run = tmp_path / "run"
    run.mkdir()
    T.save_run_config(run, TrainConfig(data="D", out=str(run), max_steps=10), ModelConfig.from_name("demo"))
    assert cli.main(["train", "--data", "D", "--out", str(run)]) == 2  # would overwrite a run
    assert "already holds a run" in one_error_line(capsys.readouterr().err, "train")
    assert cli.main(["train", "--resume", str(run), "--d-model", "64"]) == 2
    assert "model fields cannot change" in one_error_line(capsys.readouterr().err, "train")
    assert cli.main(["train", "--resume", str(run), "--max-steps", "20"]) == 0
    assert fake_train["resume"] is True and fake_train["tcfg"].max_steps == 20 and fake_train["tcfg"].data == "D"
    assert fake_train["mcfg"] == ModelConfig.from_name("demo")
    assert cli.main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "not a training run" in one_error_line(capsys.readouterr().err, "train")


# ---- generate ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tinymixtral.data import prepare

    root = tmp_path_factory.mktemp("cli-run")
    rng = random.Random(0)
    names, things = ["Tom", "Lily", "Ben", "Mia"], ["the red ball", "a big tree", "the small dog", "the park"]
    docs = [" ".join(f"{rng.choice(names)} ran to {rng.choice(things)}." for _ in range(rng.randint(2, 4)))
            for _ in range(800)]
    (root / "c.txt").write_text("\n<|endoftext|>\n".join(docs))
    prepare(str(root / "c.txt"), root / "data", "bpe:300", val_fraction=0.05)
    mcfg = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4,
                       top_k=2, max_seq_len=64)
    tcfg = TrainConfig(data=str(root / "data"), out=str(root / "run"), batch_size=8, seq_len=32, lr=1e-2,
                       warmup_steps=3, max_steps=30, eval_interval=100, eval_batches=2, log_interval=10,
                       progress=False)
    T.train(tcfg, mcfg)
    return root / "run"


@pytest.mark.parametrize("compile_flag", [[], ["--compile"]])
def test_generate_from_a_trained_model(run_dir, compile_flag):
    prompt = "Tom ran to"
    r = tm("generate", "--model", str(run_dir / "latest"), "--prompt", prompt, "--max-new-tokens", "5",
           "--temperature", "0", *compile_flag)
    assert r.returncode == 0, r.stderr
    text = r.stdout.rstrip("\n")
    assert text.startswith(prompt) and len(text) > len(prompt) and "\n" not in text
    assert "tokens in" in r.stderr and "Traceback" not in r.stderr
    # greedy decoding is the model's argmax continuation
    from tinymixtral import load_model
    from tinymixtral.generation import generate
    from tinymixtral.tokenizer import load_tokenizer

    model, tok = load_model(run_dir / "latest"), load_tokenizer(run_dir / "latest")
    ids = torch.tensor([tok.encode(prompt, bos=True)])
    new = generate(model, ids, 5, temperature=0.0, eos_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert text == tok.decode(ids[0, 1:].tolist() + new)


@pytest.mark.parametrize("argv,message", [
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-k", "0"], "top_k must be >= 1"),
    (["--prompt", ""], "the prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_bad_flags_exit_2(run_dir, capsys, argv, message):
    assert cli.main(["generate", "--model", str(run_dir / "latest"), *argv]) == 2
    captured = capsys.readouterr()
    assert message in one_error_line(captured.err, "generate") and captured.out == ""


def test_generate_bad_flags_subprocess(run_dir):
    r = tm("generate", "--model", str(run_dir / "latest"), "--top-p", "1.5")
    assert r.returncode == 2 and r.stdout == ""
    one_error_line(r.stderr, "generate")


def test_generate_missing_model_exit_2(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "none"), "--max-new-tokens", "1"]) == 2
    assert "model directory not found" in one_error_line(capsys.readouterr().err, "generate")
