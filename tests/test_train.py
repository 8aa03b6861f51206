"""`tinymixtral train`: lr schedule, a short run and its files, exact resume, W&B, the data checks
before training, and the command line's flags, errors and resume rules."""
import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tinymixtral.train as T
import tinymixtral.train_compile as train_compile
import tinymixtral.train_config as train_config
from conftest import (
    TRAIN_CFG,
    assert_one_line_error,
    call_cli,
    make_docs,
    run_cli,
    tcfg_for,
    tiny_cfg,
    tiny_model,
    write_txt,
)
from tinymixtral import cli, load_model
from tinymixtral import data as D
from tinymixtral.config import ModelConfig
from tinymixtral.data import load_split
from tinymixtral.errors import TinyMixtralError
from tinymixtral.evaluate import bits_per_byte, evaluate
from tinymixtral.run_state import read_metrics
from tinymixtral.train import TrainConfig, get_lr, train

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
        assert len(r["expert_load"]) == TRAIN_CFG.n_layers
        for layer, ratio in zip(r["expert_load"], r["load_max_min"]):
            assert len(layer) == TRAIN_CFG.n_experts and min(layer) >= 0
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
    from tinymixtral.run_state import point, save_checkpoint

    model = tiny_model(TRAIN_CFG, seed=None)
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


# ---- exact resume -----------------------------------------------------------------------------------
def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "latest" / "model.safetensors")


@pytest.mark.parametrize("recipe", [{}, {"optimizer": "muon", "schedule": "wsd", "decay_fraction": 0.5},
                                    {"max_steps": None, "max_tokens": 12 * 2 * 4 * 32, "schedule": "wsd"},
                                    {"optimizer": "muon", "schedule": "wsd", "dropout": 0.2}],
                         ids=["adamw-cosine", "muon-wsd", "token-limit-no-step-limit", "dropout"])
def test_resume_is_exact(tmp_path, data_dir, monkeypatch, recipe):
    n, accum = 6, 2
    mcfg = TRAIN_CFG.replace(router_jitter_noise=0.1, router_z_loss_coef=1e-3)
    kw = dict(max_steps=2 * n, grad_accum=accum, eval_interval=4, ckpt_interval=100, batch_size=4) | recipe
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


def test_dropout_starts_after_the_given_passes_over_the_data(tmp_path, data_dir, monkeypatch):
    """--dropout-after: the training forwards drop nothing until the run has trained on that many passes over the
    training split, then drop with --dropout (and --ffn-dropout inside the FFNs); evaluation never drops."""
    from tinymixtral.model.transformer import Transformer

    seen, real = [], Transformer.forward

    def spy(self, *args, **kwargs):
        ffn = [(layer.ffn.experts if hasattr(layer.ffn, "experts") else layer.ffn).dropout for layer in self.layers]
        seen.append((self.training, self.dropout, all(layer.dropout == self.dropout for layer in self.layers)
                     and ffn == [self.dropout / 2] * len(ffn)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", spy)
    train_len = len(load_split(data_dir, "train")[0])
    per_step = 8 * 32
    train(tcfg_for(data_dir, tmp_path / "run", max_steps=8, eval_interval=100, dropout=0.25, ffn_dropout=0.125,
                   dropout_after=4.5 * per_step / train_len), TRAIN_CFG)
    trained = [p for training, p, same in seen if training and same]
    assert len(trained) == 8 and trained == [0.0] * 5 + [0.25] * 3  # steps 1-5 start at < 4.5 steps' tokens
    assert all(p in (0.0, 0.25) for _, p, _ in seen) and any(not training for training, _, _ in seen)


def test_fp16_autocast_trains_with_a_grad_scaler_and_resumes(tmp_path, data_dir):
    """fp16 gradients underflow without loss scaling: the scaler runs, its state is checkpointed and restored."""
    out = tmp_path / "run"
    train(tcfg_for(data_dir, out, max_steps=4, eval_interval=100, ckpt_interval=2, autocast="fp16"), TRAIN_CFG)
    state = json.loads((out / "latest" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0 and "_growth_tracker" in state["grad_scaler"]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if "loss" in r)
    assert cli.main(["train", "--resume", str(out), "--max-steps", "6"]) == 0
    assert json.loads((out / "latest" / "trainer_state.json").read_text())["step"] == 6


def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path, data_dir, capsys):
    """Resume loads through build_model with strict keys: a weight missing from the checkpoint is named."""
    out = tmp_path / "run"
    train(tcfg_for(data_dir, out, max_steps=2, eval_interval=100, ckpt_interval=100), TRAIN_CFG)
    ckpt = out / "latest"
    weights = load_file(ckpt / "model.safetensors")
    weights.pop("model.layers.1.self_attn.o_proj.weight")
    save_file(weights, ckpt / "model.safetensors")
    err = assert_one_line_error(call_cli(capsys, "train", "--resume", str(out), "--max-steps", "4"), "train",
                                returncode=2)
    assert "model.layers.1.self_attn.o_proj.weight" in err


def test_run_ends_with_a_full_validation_pass(trained, data_dir):
    """In-training val numbers are estimates on eval_batches batches; the last row reads the whole split."""
    out, tcfg, final = trained
    rows = read_metrics(out)
    estimates = [r for r in rows if "val_loss" in r]
    val, meta = load_split(data_dir, "val")
    n_fit = (len(val) - 1) // tcfg.seq_len
    assert all(r["val_tokens"] == min(n_fit, tcfg.eval_batches * tcfg.batch_size) * tcfg.seq_len for r in estimates)
    last = rows[-1]
    assert "final_val_loss" in last and last["val_tokens"] == n_fit * tcfg.seq_len > estimates[-1]["val_tokens"]
    model = load_model(out / "latest", dtype=torch.float32)
    assert last["final_val_loss"] == pytest.approx(evaluate(model, val, tcfg.batch_size, tcfg.seq_len, "cpu", None),
                                                   rel=1e-5)
    assert final["final_val_bpb"] == pytest.approx(bits_per_byte(last["final_val_loss"], meta, "val"))


def test_done_line_reports_the_full_split(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(data_dir), "--out", str(out), "--preset", "demo", "--vocab-size", "300",
                     "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--d-ff", "32",
                     "--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-interval", "100",
                     "--progress", "false"]) == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    final = read_metrics(out)[-1]
    assert done and f"val bpb {final['final_val_bpb']:.4f} (the whole val split, {final['val_tokens']:,} tokens)" \
        in done[0]


def test_every_train_flag_has_help_from_its_field_comment():
    helps = {a.dest: a.help for a in _train_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("data", "out"):
            assert helps[f.name] and len(helps[f.name]) > 10, f.name
    assert helps["grad_accum"].startswith("micro-batches per optimizer step")  # the comment beside the field
    assert "(default 1)" in helps["grad_accum"]


# ---- W&B --------------------------------------------------------------------------------------------
def test_wandb_offline(tmp_path, data_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    out = tmp_path / "run"
    train(tcfg_for(data_dir, out, max_steps=2, eval_interval=100, wandb=True), TRAIN_CFG)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    assert list(runs[0].glob("*.wandb"))


def test_a_failed_run_ends_its_wandb_run(tmp_path, data_dir, monkeypatch):
    """A run that fails after W&B started ends the W&B run: else the process keeps it active, and the next
    wandb.init (the next run in a notebook, or the next test) returns it and logs into the failed run's files."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")

    def boom(*a, **k):
        raise RuntimeError("no batch")

    monkeypatch.setattr(T, "get_batch", boom)
    with pytest.raises(RuntimeError, match="no batch"):
        train(tcfg_for(data_dir, tmp_path / "run", max_steps=2, eval_interval=100, wandb=True), TRAIN_CFG)
    assert wandb.run is None


# ---- limits: a time or token limit is not cut short by a default step count ------------------------
# ---- --compile auto ------------------------------------------------------------------------------------
def test_compile_auto_compiles_long_single_process_runs():
    def c(device="cpu", distributed=False, **kw):
        return train_compile.compiles(TrainConfig(**kw), device, distributed)

    assert c(max_time=600) and c(max_steps=300) and c(max_steps=None, max_tokens=300 * 16 * 256)
    assert not c(max_time=60) and not c(max_steps=299) and not c(max_steps=None, max_tokens=299 * 16 * 256)
    assert not c(max_time=600, distributed=True) and not c(max_time=600, device="mps")
    assert c(max_steps=5, compile=True, distributed=True) and not c(max_time=600, compile=False)


@pytest.mark.parametrize("compiling", ["works", "fails"])
def test_compiling_leaves_the_run_as_an_eager_one(tmp_path, data_dir, monkeypatch, compiling):
    """The trial batch that compiles the model draws nothing from the run's generators and leaves no gradient: a run
    whose compile is the identity ends with an eager run's weights, bit for bit; one whose compile fails (--compile
    auto) warns once and trains eagerly, the same; --compile true refuses in one line."""
    kw = dict(max_steps=4, eval_interval=2, ckpt_interval=100, dropout=0.2, optimizer="muon")
    train(tcfg_for(data_dir, tmp_path / "eager", compile=False, **kw), TRAIN_CFG)

    def broken(model):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler\nand inductor's pages")
        return call

    monkeypatch.setattr(train_compile.torch, "compile", (lambda model: model) if compiling == "works" else broken)
    monkeypatch.setattr(train_compile, "AUTO_COMPILE_STEPS", 4)
    if compiling == "works":
        train(tcfg_for(data_dir, tmp_path / "auto", compile="auto", **kw), TRAIN_CFG)
    else:
        with pytest.warns(UserWarning, match=r"^torch.compile failed \(no C\+\+ compiler\); training eagerly$"):
            train(tcfg_for(data_dir, tmp_path / "auto", compile="auto", **kw), TRAIN_CFG)
        with pytest.raises(TinyMixtralError, match=r"\(no C\+\+ compiler\); train with --compile false$"):
            train(tcfg_for(data_dir, tmp_path / "true", compile=True, **kw), TRAIN_CFG)
    wa, wb = _weights(tmp_path / "eager"), _weights(tmp_path / "auto")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda rows: [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "eager")) == strip(read_metrics(tmp_path / "auto"))


def test_max_steps_defaults_only_when_no_other_limit_is_given():
    assert TrainConfig().max_steps == T.DEFAULT_MAX_STEPS == 1000
    assert TrainConfig(max_time=60).max_steps is None and TrainConfig(max_tokens=10).max_steps is None
    assert TrainConfig(max_steps=5, max_time=60).max_steps == 5
    assert T.load_run_config  # run.json stores the resolved value, so a resume keeps it (test_resume_is_exact)


def test_a_token_limited_run_goes_past_the_default_step_count(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(train_config, "DEFAULT_MAX_STEPS", 2)
    small = dict(batch_size=2, seq_len=16, eval_interval=100, ckpt_interval=100)
    final = train(tcfg_for(data_dir, tmp_path / "a", max_steps=None, max_tokens=5 * 2 * 16, **small), TRAIN_CFG)
    assert final["step"] == 5  # the token limit binds, not DEFAULT_MAX_STEPS
    final = train(tcfg_for(data_dir, tmp_path / "b", max_steps=None, **small), TRAIN_CFG)
    assert final["step"] == 2  # no limit given: the default step count
    final = train(tcfg_for(data_dir, tmp_path / "c", max_steps=3, max_tokens=5 * 2 * 16, **small), TRAIN_CFG)
    assert final["step"] == 3  # an explicit --max-steps still binds


# ---- data checks before the first step --------------------------------------------------------------
def test_train_refuses_data_with_a_larger_vocab_than_the_model(tmp_path):
    D.prepare(str(write_txt(tmp_path / "c.txt", make_docs(600)[:200])), tmp_path / "data", "bpe:300", val_fraction=0.1)
    vocab = json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"]
    mcfg = tiny_cfg(vocab_size=100, n_layers=1)
    tcfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), batch_size=2, seq_len=16,
                       max_steps=1, progress=False)
    with pytest.raises(TinyMixtralError, match=rf"{vocab} tokens but the model's vocab_size is 100") as e:
        train(tcfg, mcfg)
    assert "--vocab-size" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_val_split_shorter_than_a_window(tmp_path):
    """Checked before training: the first evaluation would otherwise fail after the steps it cost."""
    docs = make_docs(60)
    D.prepare(str(write_txt(tmp_path / "c.txt", docs)), tmp_path / "data", "bpe:300", val_fraction=0.02)
    n_val = json.loads((tmp_path / "data" / "meta.json").read_text())["val_tokens"]
    assert n_val < 200
    mcfg = tiny_cfg(vocab_size=320, n_layers=1, max_seq_len=256)
    tcfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), batch_size=2, seq_len=n_val,
                       max_steps=2, progress=False)  # one token short of a window
    with pytest.raises(TinyMixtralError, match=rf"the val split has only {n_val} tokens.*\({n_val + 1}\)"):
        train(tcfg, mcfg)
    assert not (tmp_path / "run").exists()


# ---- the command line: flags, errors and resume rules ---------------------------------------------
def test_train_without_data_exit_2():
    assert "--data" in assert_one_line_error(run_cli("train", "--out", "somewhere"), "train", 2)


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
                    fsdp=True, fsdp_bf16=True, optimizer="muon", muon_lr=0.03, muon_experts=False, schedule="wsd",
                    decay_fraction=0.3,
                    progress=False)
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
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "r2"), "--d-model", "64",
                     "--vocab-size", "512"]) == 0
    assert fake_train["mcfg"] == demo.replace(d_model=64, vocab_size=512) and fake_train["tcfg"] == TrainConfig(
        data="D", out=str(tmp_path / "r2"), **train_config.TUNED)


def test_the_model_vocabulary_comes_from_the_data(tmp_path, data_dir, fake_train, saved):
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert vocab != ModelConfig.from_name("demo").vocab_size
    assert cli.main(["train", "--data", str(data_dir), "--out", str(tmp_path / "a")]) == 0
    assert fake_train["mcfg"] == ModelConfig.from_name("demo").replace(vocab_size=vocab)
    assert cli.main(["train", "--data", str(data_dir), "--out", str(tmp_path / "b"), "--vocab-size", "512"]) == 0
    assert fake_train["mcfg"].vocab_size == 512  # an explicit --vocab-size wins
    assert cli.main(["train", "--data", str(data_dir), "--out", str(tmp_path / "c"), "--config",
                     str(saved[0] / "config.json")]) == 0
    assert fake_train["mcfg"].vocab_size == ModelConfig.load(saved[0] / "config.json").vocab_size  # so does a config


def test_recipes_set_training_values_under_the_flags(tmp_path, fake_train, capsys):
    demo = T.RECIPES["demo"]
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "a"), "--recipe", "demo", "--vocab-size", "512",
                     "--lr", "1e-3"]) == 0
    tcfg = fake_train["tcfg"]
    assert tcfg.lr == 1e-3  # a flag given beats the recipe
    assert all(getattr(tcfg, k) == v for k, v in demo.items() if k not in ("preset", "lr"))
    assert tcfg.eval_interval != TrainConfig().eval_interval  # the recipe's values arrived
    assert fake_train["mcfg"] == ModelConfig.from_name(demo["preset"]).replace(vocab_size=512)
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "b"), "--vocab-size", "512"]) == 0
    # "default": the tuned recipe (Muon + WSD) over TrainConfig's own defaults
    assert fake_train["tcfg"] == TrainConfig(data="D", out=str(tmp_path / "b"), **train_config.TUNED)
    assert fake_train["tcfg"].optimizer == "muon" and fake_train["tcfg"].schedule == "wsd"
    r = call_cli(capsys, "train", "--data", "D", "--out", tmp_path / "c", "--recipe", "fast")
    assert "unknown --recipe 'fast'" in assert_one_line_error(r, "train", 2)


def test_fsdp_without_an_optimizer_flag_takes_adamw(tmp_path, fake_train, capsys):
    """The default recipe's Muon needs whole matrices; under --fsdp the recipe falls back to AdamW."""
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "a"), "--vocab-size", "512", "--fsdp", "true"]) == 0
    assert fake_train["tcfg"].optimizer == "adamw" and fake_train["tcfg"].schedule == "wsd"
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "b"), "--vocab-size", "512"]) == 0
    assert fake_train["tcfg"].optimizer == "muon"


def test_run_py_demo_trains_the_tuned_demo_recipe(tmp_path, fake_train):
    """run.py demo passes DEMO_TRAIN to `train`: the demo recipe for 8 minutes, no step limit."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_py", Path(__file__).parents[1] / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    assert cli.main(["train", "--data", "D", "--out", str(tmp_path / "a"), "--vocab-size", "512",
                     *run_py.DEMO_TRAIN]) == 0
    t = fake_train["tcfg"]
    assert (t.batch_size, t.seq_len, t.lr, t.warmup_steps, t.optimizer, t.schedule) == (16, 256, 4e-3, 20, "muon",
                                                                                       "wsd")
    assert (t.max_time, t.max_steps, t.eval_interval, t.eval_batches, t.ckpt_interval) == (480.0, None, 250, 10, 1000)
    assert fake_train["mcfg"] == ModelConfig.from_name("demo").replace(vocab_size=512)


# ---- data checks before the first step --------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
    (["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1) and finite"),
    (["--grad-clip", "nan"], "--grad-clip must be > 0 and finite"),
    (["--max-time", "-10"], "--max-time must be a positive duration"),
    (["--autocast", "fp8"], "--autocast must be none, bf16, fp16 or auto"),
    (["--max-time", "soon"], "--max-time must look like"),
    (["--n-heads", "5"], "n_heads"),
    (["--preset", "nope"], "unknown preset"),
])
def test_train_bad_flags_exit_2(tmp_path, fake_train, capsys, argv, message):
    r = call_cli(capsys, "train", "--data", "D", "--out", tmp_path / "run", *argv)
    assert message in assert_one_line_error(r, "train", 2)
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
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    (run / "latest").symlink_to("checkpoints/step-5")  # a run that saved a checkpoint (one that never did may restart)
    r = call_cli(capsys, "train", "--data", "D", "--out", run)  # would overwrite a run
    assert "already holds a run" in assert_one_line_error(r, "train", 2)
    r = call_cli(capsys, "train", "--resume", run, "--d-model", "64")
    assert "model fields cannot change" in assert_one_line_error(r, "train", 2)
    r = call_cli(capsys, "train", "--resume", run, "--recipe", "demo")
    assert "--recipe cannot change" in assert_one_line_error(r, "train", 2)
    assert cli.main(["train", "--resume", str(run), "--max-steps", "20"]) == 0
    assert fake_train["resume"] is True and fake_train["tcfg"].max_steps == 20 and fake_train["tcfg"].data == "D"
    assert fake_train["mcfg"] == ModelConfig.from_name("demo")
    r = call_cli(capsys, "train", "--resume", tmp_path / "nope")
    assert "not a training run" in assert_one_line_error(r, "train", 2)
