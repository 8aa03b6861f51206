"""Evaluation (`tinymixtral eval`): deterministic loss and bits per byte, on the shared short training run."""
import json
import math

import pytest
import torch

from conftest import TRAIN_CFG, assert_one_line_error, run_cli
from tinymixtral import load_model
from tinymixtral.data import load_split
from tinymixtral.evaluate import bits_per_byte, evaluate


def test_evaluate_deterministic_and_bits_per_byte(trained, data_dir):
    out, _, final = trained
    model = load_model(out / "latest", dtype=torch.float32)
    val, meta = load_split(data_dir, "val")
    a = evaluate(model, val, 8, 32, "cpu", 4)
    b = evaluate(model, val, 8, 32, "cpu", 4)
    assert a == b and a == pytest.approx(final["val_loss"], rel=1e-5)
    assert bits_per_byte(a, meta, "val") == pytest.approx(a / math.log(2) * meta["val_tokens"] / meta["val_bytes"])
    assert final["val_bpb"] == pytest.approx(bits_per_byte(final["val_loss"], meta, "val"))


def test_eval_cli_json(trained, data_dir):
    out, _, _ = trained
    r = run_cli("eval", "--model", out / "latest", "--data", data_dir, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    meta = json.loads((data_dir / "meta.json").read_text())
    assert res["split"] == "val" and res["seq_len"] == TRAIN_CFG.max_seq_len
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert res["bpb"] == pytest.approx(res["loss"] / math.log(2) * meta["val_tokens"] / meta["val_bytes"])
    model = load_model(out / "latest", dtype=torch.float32)
    val, _ = load_split(data_dir, "val")
    assert res["loss"] == pytest.approx(evaluate(model, val, 8, 64, "cpu", None), rel=1e-6)


def test_eval_says_which_checkpoint_it_read(trained, data_dir):
    out, _, _ = trained
    r = run_cli("eval", "--model", out / "best", "--data", data_dir, "--max-batches", "1")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first == str((out / "best").resolve()) and "/checkpoints/step-" in first
    assert r.stdout.splitlines()[1].startswith("val: loss") and "tokens, windows of" in r.stdout


@pytest.mark.parametrize("flags,tol", [(["--dtype", "bf16"], 0.02), (["--bits", "8"], 0.02), (["--bits", "4"], 0.1)])
def test_eval_loads_cast_or_quantized(trained, data_dir, flags, tol):
    out, _, _ = trained
    full = json.loads(run_cli("eval", "--model", out / "latest", "--data", data_dir, "--json").stdout)
    r = run_cli("eval", "--model", out / "latest", "--data", data_dir, "--json", *flags)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == pytest.approx(full["loss"], rel=tol)


def test_eval_group_size_needs_int4(trained, data_dir):
    out, _, _ = trained
    assert_one_line_error(run_cli("eval", "--model", out / "latest", "--data", data_dir, "--group-size", "64"),
                          "eval", returncode=2)



@pytest.mark.parametrize("seq_len", ["0", "-5", "100000"])
def test_eval_refuses_a_seq_len_it_would_have_changed(trained, data_dir, seq_len):
    """--seq-len 0 once became 512 and 100000 was capped, silently (issue 16): now one line, exit 2."""
    out, _, _ = trained
    r = run_cli("eval", "--model", out / "latest", "--data", data_dir, "--seq-len", seq_len)
    assert "--seq-len must be between 1 and" in assert_one_line_error(r, "eval", returncode=2)
