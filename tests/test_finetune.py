"""Fine-tuning: `train --init-from` any model directory (ours, transformers', Mistral-native), `--train-only`,
and the tokenizer identity that eval, routes, resume and init-from check against prepared data."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tinymixtral.train as T
from conftest import TRAIN_CFG, assert_one_line_error, call_cli, make_docs, tiny_model, write_txt
from tinymixtral import load_model, save_model
from tinymixtral.checkpoint import model_config
from tinymixtral.data import get_batch, load_split, prepare
from tinymixtral.run_state import read_metrics
from tinymixtral.tokenizer import load_tokenizer

STEPS = ["--batch-size", "8", "--seq-len", "32", "--eval-interval", "10", "--eval-batches", "2",
         "--log-interval", "1", "--seed", "7", "--progress", "false"]


def source_dir(path, data_dir, fmt="ours", **over):
    """A random TRAIN_CFG model (weights large enough that every part matters) written in `fmt` (ours,
    transformers' save_pretrained, Mistral-native), with the data's tokenizer."""
    model = tiny_model(TRAIN_CFG, std=0.1, **over)
    if fmt == "transformers":
        from transformers import MixtralConfig, MixtralForCausalLM

        ours = path.parent / "tmp-ours"
        save_model(model, ours)
        hf = MixtralForCausalLM.from_pretrained(ours, config=MixtralConfig.from_pretrained(ours))
        hf.save_pretrained(path)
        shutil.rmtree(ours)
        for f in (data_dir / "tokenizer").iterdir():
            shutil.copy(f, path / f.name)
    else:
        save_model(model, path, tokenizer=data_dir / "tokenizer", format="mistral" if fmt == "native" else "hf")
    return path, model


@pytest.mark.parametrize("fmt", ["ours", pytest.param("transformers", marks=pytest.mark.slow), "native"])
def test_first_step_loss_equals_the_source_models_loss(tmp_path, capsys, data_dir, fmt):
    src, _ = source_dir(tmp_path / "src", data_dir, fmt)
    r = call_cli(capsys, "train", "--init-from", src, "--data", data_dir, "--out", tmp_path / "run",
                 "--max-steps", "1", *STEPS)
    assert r.returncode == 0, r.stderr
    first = next(row for row in read_metrics(tmp_path / "run") if "loss" in row)
    data, _ = load_split(data_dir, "train")
    x, y = get_batch(data, 8, 32, torch.Generator().manual_seed(7), "cpu")  # the run's first batch
    with torch.no_grad():
        logits = load_model(src, dtype=torch.float32)(x)
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item(),
                                          rel=1e-5)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train"]["init_from"] == str(src) and run["model"]["d_model"] == TRAIN_CFG.d_model
    ckpt = tmp_path / "run" / "latest"
    assert load_tokenizer(ckpt).identity() == load_tokenizer(src).identity()


def test_init_from_keeps_shapes_and_lets_routing_change(tmp_path, capsys, data_dir, monkeypatch):
    src, _ = source_dir(tmp_path / "src", data_dir)
    seen = {}
    monkeypatch.setattr(T, "train", lambda tcfg, mcfg, resume=False: seen.update(tcfg=tcfg, mcfg=mcfg) or {})
    args = ["train", "--init-from", src, "--data", data_dir, "--out", tmp_path / "run"]
    assert call_cli(capsys, *args, "--router-aux-loss-coef", "0.05", "--capacity-factor", "1.5",
                    "--router-z-loss-coef", "1e-3", "--router-jitter-noise", "0.01").returncode == 0
    assert seen["mcfg"] == model_config(src).replace(router_aux_loss_coef=0.05, capacity_factor=1.5,
                                                     router_z_loss_coef=1e-3, router_jitter_noise=0.01)
    for bad, message in [(["--d-model", "64"], "--d-model cannot change with --init-from"),
                         (["--n-experts", "8"], "--n-experts cannot change with --init-from"),
                         (["--preset", "demo"], "drop --preset / --config")]:
        assert message in assert_one_line_error(call_cli(capsys, *args, *bad), "train", 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(src / "config.json", empty / "config.json")
    r = call_cli(capsys, "train", "--init-from", empty, "--data", data_dir, "--out", tmp_path / "r2")
    assert "no model.safetensors" in assert_one_line_error(r, "train", 2)
    r = call_cli(capsys, "train", "--init-from", tmp_path / "nope", "--data", data_dir, "--out", tmp_path / "r2")
    assert "model directory not found" in assert_one_line_error(r, "train", 2)
    assert not (tmp_path / "r2").exists()


def optimizer_moments(ckpt) -> set[str]:
    """The first-moment tensors a checkpoint's optimizer state holds: one per trained parameter."""
    state = load_file(ckpt / "trainer_state.safetensors")
    return {k for k in state if k.startswith("opt.") and k.endswith(".exp_avg")}


@pytest.mark.parametrize("part,changes", [
    ("router", ("block_sparse_moe.gate",)),
    ("experts", ("block_sparse_moe.experts",)),
    ("attention", ("self_attn",)),
])
def test_train_only_leaves_the_rest_bit_identical(tmp_path, capsys, data_dir, part, changes):
    src, model = source_dir(tmp_path / "src", data_dir)
    run = tmp_path / "run"
    r = call_cli(capsys, "train", "--init-from", src, "--data", data_dir, "--out", run, "--max-steps", "3",
                 "--train-only", part, *STEPS)
    assert r.returncode == 0, r.stderr
    if part == "router":  # a resumed run keeps training the router alone
        r = call_cli(capsys, "train", "--resume", run, "--max-steps", "4", "--progress", "false")
        assert r.returncode == 0, r.stderr
        r = call_cli(capsys, "train", "--resume", run, "--max-steps", "5", "--train-only", "all")
        assert "--train-only cannot change" in assert_one_line_error(r, "train", 2)
    before, after = load_file(src / "model.safetensors"), load_file(run / "latest" / "model.safetensors")
    assert set(before) == set(after)  # the checkpoint is a complete model directory
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(any(c in k for c in changes) for k in moved)
    n_trained = sum(1 for k in before if any(c in k for c in changes))
    moments = optimizer_moments(run / "latest")  # the optimizer holds the trained tensors only
    n_ours = {"router": 2, "experts": 4, "attention": 4}[part]  # routers; w13+w2; wqkv+wo, per layer x 2 layers
    assert len(moments) == n_ours and len(moved) <= n_trained


def test_train_only_router_on_a_dense_model(tmp_path, capsys, data_dir):
    src, _ = source_dir(tmp_path / "src", data_dir, n_experts=0)
    r = call_cli(capsys, "train", "--init-from", src, "--data", data_dir, "--out", tmp_path / "run",
                 "--train-only", "router", *STEPS)
    assert "--train-only router needs an MoE" in assert_one_line_error(r, "train", 2)
    r = call_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "run", "--train-only", "everything")
    assert "--train-only must be router, experts, attention or all" in assert_one_line_error(r, "train", 2)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """The same kind of text prepared with another BPE (another vocabulary)."""
    root = tmp_path_factory.mktemp("other")
    prepare(str(write_txt(root / "docs.txt", make_docs(300, seed=3))), root / "data", "bpe:290", val_fraction=0.1)
    return root / "data"


def test_data_of_another_tokenizer_are_refused(tmp_path, capsys, data_dir, other_data):
    src, _ = source_dir(tmp_path / "src", data_dir)
    meta = json.loads((other_data / "meta.json").read_text())
    assert meta["tokenizer_id"] != json.loads((data_dir / "meta.json").read_text())["tokenizer_id"]
    for argv in (["eval", "--model", src, "--data", other_data],
                 ["routes", "--model", src, "--data", other_data],
                 ["train", "--init-from", src, "--data", other_data, "--out", tmp_path / "run", *STEPS]):
        line = assert_one_line_error(call_cli(capsys, *argv), argv[0], 2)
        assert "was prepared with another tokenizer" in line and f"--tokenizer {src}" in line
    assert not (tmp_path / "run").exists()
    # resume: the run's data directory re-prepared with another tokenizer
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    assert call_cli(capsys, "train", "--init-from", src, "--data", data, "--out", tmp_path / "r",
                    "--max-steps", "2", *STEPS).returncode == 0
    shutil.rmtree(data)
    shutil.copytree(other_data, data)
    r = call_cli(capsys, "train", "--resume", tmp_path / "r", "--max-steps", "3")
    assert "was prepared with another tokenizer" in assert_one_line_error(r, "train", 2)


def test_old_data_without_a_recorded_identity(tmp_path, capsys, data_dir, other_data):
    """meta.json without "tokenizer_id": the tokenizer/ saved beside the data is compared; without it too,
    nothing can be compared and the data are accepted."""
    src, _ = source_dir(tmp_path / "src", data_dir)
    old = tmp_path / "old"
    shutil.copytree(other_data, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["tokenizer_id"]
    (old / "meta.json").write_text(json.dumps(meta))
    r = call_cli(capsys, "eval", "--model", src, "--data", old)
    assert "was prepared with another tokenizer" in assert_one_line_error(r, "eval", 2)
    shutil.rmtree(old / "tokenizer")
    assert call_cli(capsys, "eval", "--model", src, "--data", old, "--max-batches", "1").returncode == 0


def test_prepare_with_a_models_tokenizer(tmp_path, capsys, data_dir):
    src, model = source_dir(tmp_path / "src", data_dir)
    docs = write_txt(tmp_path / "docs.txt", make_docs(60, seed=5))
    r = call_cli(capsys, "prepare", docs, "--out", tmp_path / "data", "--tokenizer", src, "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    tok = load_tokenizer(src)
    assert meta["tokenizer_id"] == tok.identity() and meta["tokenizer"] == str(src)
    data, _ = load_split(tmp_path / "data", "train")
    assert np.asarray(data).max() < tok.vocab_size
    r = call_cli(capsys, "eval", "--model", src, "--data", tmp_path / "data", "--json")
    assert r.returncode == 0, r.stderr
