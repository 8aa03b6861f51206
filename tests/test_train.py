"""`tinymixtral train`: lr schedule, a short run and its files, exact resume, eval, W&B, DDP and FSDP2."""
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tinymixtral.train as T
from tinymixtral import cli, load_model
from tinymixtral.config import ModelConfig
from tinymixtral.data import load_split, prepare
from tinymixtral.run_state import read_metrics
from tinymixtral.evaluate import bits_per_byte, evaluate
from tinymixtral.train import TrainConfig, get_lr, train

PNG = b"\x89PNG\r\n\x1a\n"
MODEL = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4, top_k=2,
             max_seq_len=64, rope_theta=1e4, router_aux_loss_coef=0.01)


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names, verbs = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"], ["ran to", "looked at", "played with", "found"]
    things = ["the red ball", "a big tree", "the small dog", "a blue box", "the happy cat", "the park"]
    return [" ".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}." for _ in range(rng.randint(2, 5)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    src = root / "corpus.txt"
    src.write_text("\n<|endoftext|>\n".join(make_docs(1500)))
    prepare(str(src), root / "data", "bpe:300", val_fraction=0.05, seed=0)
    return root / "data"


def tcfg_for(data_dir, out, **kw) -> TrainConfig:
    base = dict(data=str(data_dir), out=str(out), batch_size=8, seq_len=32, lr=1e-2, warmup_steps=3,
                max_steps=20, eval_interval=10, eval_batches=4, log_interval=1, ckpt_interval=10, keep_last=2,
                seed=7, progress=False)
    return TrainConfig(**{**base, **kw})


# ---- the learning-rate schedule ---------------------------------------------------------------------
def test_get_lr_warmup_peak_and_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, max_steps=100)
    lrs = [get_lr(s, s / cfg.max_steps, cfg) for s in range(cfg.max_steps + 1)]
    # warmup: linear in the step, (step+1)/warmup of the (cosine-scaled) peak
    for s in range(10):
        cos = 0.5 * (1 + math.cos(math.pi * s / 100))
        assert lrs[s] == pytest.approx(1e-3 * (s + 1) / 10 * (0.1 + 0.9 * cos))
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert max(lrs) == lrs[9]  # the peak is at the end of warmup
    assert all(b <= a for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(1e-3 * 0.1)  # lr * min_lr_ratio at progress 1
    assert get_lr(500, 5.0, cfg) == pytest.approx(1e-4) and get_lr(0, -1.0, cfg) == pytest.approx(1e-4)
    no_warm = dataclasses.replace(cfg, warmup_steps=0)
    assert get_lr(0, 0.0, no_warm) == pytest.approx(1e-3)
    assert get_lr(50, 0.5, no_warm) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))


# ---- a short run and everything it writes -----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("run") / "run"
    tcfg = tcfg_for(data_dir, out, max_steps=40, keep_last=2)
    final = train(tcfg, ModelConfig(**MODEL))
    return out, tcfg, final


def test_short_run_learns_and_logs(trained):
    out, tcfg, final = trained
    rows = read_metrics(out)
    evals = [r for r in rows if "val_loss" in r]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert steps[0]["loss"] == pytest.approx(math.log(300), abs=0.3)  # starts near uniform over the vocab
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert evals[-1]["val_loss"] < 0.6 * math.log(300)
    assert final["step"] == 40 and final["val_loss"] == evals[-1]["val_loss"]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    for r in steps:
        assert {"loss", "aux_loss", "lr", "grad_norm", "tok_per_s", "mfu", "expert_load", "load_max_min",
                "tokens", "elapsed"} <= set(r)
        assert r["tokens"] == r["step"] * tcfg.batch_size * tcfg.seq_len
        assert r["lr"] > 0 and r["grad_norm"] > 0 and r["tok_per_s"] > 0 and 0 < r["mfu"]
        assert len(r["expert_load"]) == MODEL["n_layers"]
        for layer, ratio in zip(r["expert_load"], r["load_max_min"]):
            assert len(layer) == MODEL["n_experts"] and min(layer) >= 0
            assert sum(layer) == pytest.approx(1.0)
            assert ratio is None if min(layer) == 0 else ratio == pytest.approx(max(layer) / min(layer))
    assert steps[-1]["lr"] == pytest.approx(get_lr(39, 39 / 40, tcfg))
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["train"]["max_steps"] == 40 and run_json["model"]["d_model"] == 32


def test_checkpoints_symlinks_and_pruning(trained):
    out, _, _ = trained
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-30", "step-40"]  # keep_last=2
    for name in ("latest", "best"):
        link = out / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == ckpts / "step-40"
    for ckpt in ckpts.iterdir():
        files = {p.name for p in ckpt.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "trainer_state.json", "trainer_state.safetensors"} <= files
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == int(ckpt.name.split("-")[1]) and state["best_step"] == state["step"]
    assert not [p for p in out.rglob(".*") if p.name.startswith(".")]  # no partial/temp leftovers


def test_keep_last_never_prunes_the_best(tmp_path):
    from tinymixtral.model.transformer import Transformer
    from tinymixtral.run_state import point, save_checkpoint

    model = Transformer(ModelConfig(**MODEL))
    rng = {"torch": torch.get_rng_state()}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, None, {"step": step}, rng, None, keep_last=1, best_step=2)
        if step == 2:
            point(tmp_path, "best", tmp_path / "checkpoints" / "step-2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (tmp_path / "latest").resolve().name == "step-4" and (tmp_path / "best").resolve().name == "step-2"


def test_checkpoint_is_a_hf_model_dir(trained, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinymixtral.tokenizer import load_tokenizer

    out, _, _ = trained
    ckpt = out / "latest"
    ours = load_model(ckpt, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    val, _ = load_split(data_dir, "val")
    x = torch.from_numpy(val[:2 * 32].astype(np.int64)).view(2, 32)
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    ref = load_tokenizer(data_dir / "tokenizer")
    text = "Tom ran to the park."
    assert load_tokenizer(ckpt).encode(text) == ref.encode(text)
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    assert hf_tok(text)["input_ids"] == ref.encode(text, bos=True)


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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tinymixtral", "eval", "--model", str(out / "latest"), "--data",
                        str(data_dir), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    meta = json.loads((data_dir / "meta.json").read_text())
    assert res["split"] == "val" and res["seq_len"] == MODEL["max_seq_len"]
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert res["bpb"] == pytest.approx(res["loss"] / math.log(2) * meta["val_tokens"] / meta["val_bytes"])
    model = load_model(out / "latest", dtype=torch.float32)
    val, _ = load_split(data_dir, "val")
    assert res["loss"] == pytest.approx(evaluate(model, val, 8, 64, "cpu", None), rel=1e-6)


# ---- exact resume -----------------------------------------------------------------------------------
def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "latest" / "model.safetensors")


def test_resume_is_exact(tmp_path, data_dir, monkeypatch):
    n, accum = 6, 2
    mcfg = ModelConfig(**{**MODEL, "router_jitter_noise": 0.1, "router_z_loss_coef": 1e-3})
    kw = dict(max_steps=2 * n, grad_accum=accum, eval_interval=4, ckpt_interval=100, batch_size=4)
    train(tcfg_for(data_dir, tmp_path / "A", **kw), mcfg)

    real, calls = T.get_batch, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == n * accum + 1:  # the first micro-batch of step n+1: as if Ctrl-C was pressed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "get_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(tcfg_for(data_dir, tmp_path / "B", **kw), mcfg)
    monkeypatch.setattr(T, "get_batch", real)
    b = tmp_path / "B"
    assert (b / "latest").resolve() == b / "checkpoints" / f"step-{n}"
    assert json.loads((b / "latest" / "trainer_state.json").read_text())["step"] == n
    assert max(r["step"] for r in read_metrics(b)) == n

    assert cli.main(["train", "--resume", str(b)]) == 0  # the CLI path: run.json gives both configs
    wa, wb = _weights(tmp_path / "A"), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert (b / "latest").resolve().name == f"step-{2 * n}"
    rows_a, rows_b = read_metrics(tmp_path / "A"), read_metrics(b)
    strip = lambda rows: [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)  # same train and eval rows, none repeated at the resume point
    opt_a = load_file(tmp_path / "A" / "latest" / "trainer_state.safetensors")
    opt_b = load_file(b / "latest" / "trainer_state.safetensors")
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)


# ---- W&B --------------------------------------------------------------------------------------------
def test_wandb_offline(tmp_path, data_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    out = tmp_path / "run"
    train(tcfg_for(data_dir, out, max_steps=2, eval_interval=100, wandb=True), ModelConfig(**MODEL))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    assert list(runs[0].glob("*.wandb"))


# ---- DDP and FSDP2 ----------------------------------------------------------------------------------
DIST_FLAGS = ["--preset", "demo", "--vocab-size", "320", "--d-model", "32", "--n-layers", "2", "--n-heads", "4",
              "--n-kv-heads", "2", "--d-ff", "64", "--n-experts", "4", "--top-k", "2", "--max-seq-len", "64",
              "--router-aux-loss-coef", "0", "--seq-len", "32", "--max-steps", "5", "--log-interval", "1",
              "--eval-interval", "100", "--eval-batches", "2", "--lr", "1e-2", "--warmup-steps", "2",
              "--seed", "11", "--progress", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> str:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return str(exe)
    found = shutil.which("torchrun")
    if not found:
        pytest.skip("torchrun is not available")
    return found


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(["train", "--data", str(data_dir), "--out", str(out), "--batch-size", "8", *DIST_FLAGS]) == 0
    return out


def _launch(tmp_path, data_dir, *extra) -> Path:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [_torchrun(), "--nproc_per_node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "tinymixtral", "train", "--data", str(data_dir), "--out", str(out), "--batch-size", "4",
           *DIST_FLAGS, *extra]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _compare_losses(a: Path, b: Path):
    la = [(r["step"], r["loss"]) for r in read_metrics(a) if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in read_metrics(b) if "loss" in r]
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4, 5]
    for (_, x), (_, y) in zip(la, lb):
        assert abs(x - y) < 1e-5, (la, lb)


def test_ddp_matches_a_single_process(tmp_path, data_dir, single_process):
    ddp = _launch(tmp_path, data_dir)
    _compare_losses(single_process, ddp)
    wa, wb = _weights(single_process), _weights(ddp)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
    assert (ddp / "latest" / "trainer_state.safetensors").is_file() and (ddp / "loss.png").is_file()


def test_fsdp2_matches_a_single_process(tmp_path, data_dir, single_process):
    fsdp = _launch(tmp_path, data_dir, "--fsdp", "true")
    _compare_losses(single_process, fsdp)
    model = load_model(fsdp / "latest", dtype=torch.float32)
    ref = load_model(single_process / "latest", dtype=torch.float32)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], ref_sd[k], atol=1e-5, rtol=0, msg=k)
