"""Upcycling (`tinymixtral upcycle`): a dense model's FFN copied into identical experts computes the dense
function, noise is relative and seeded, the result loads in transformers, and bad input fails cleanly."""
import json

import pytest
import torch

from conftest import DENSE, assert_one_line_error, call_cli, tiny_dense_dir, tiny_model
from tinymixtral import cli
from tinymixtral.checkpoint import load_model, read_safetensors, save_model
from tinymixtral.upcycling import upcycle, upcycle_dir


@pytest.mark.parametrize("router", ["random", "zero", "large"])
def test_upcycled_identical_experts_compute_the_dense_function(router):
    dense = tiny_model(DENSE, vocab_size=300)
    moe = upcycle(dense, 4, 2, router="zero" if router == "zero" else "random", seed=1)
    if router == "large":  # any router at all: sharp, arbitrary weights still sum to 1 over identical experts
        for layer in moe.layers:
            layer.ffn.router.weight.data.normal_(0, 3.0)
    assert moe.cfg.n_experts == 4 and moe.cfg.top_k == 2 and moe.cfg.model_type == "mixtral"
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)
    chosen = torch.cat([r.experts_NK.reshape(-1) for r in moe.routing()])
    if router != "zero":
        assert len(chosen.unique()) == 4  # the router really spreads tokens over experts


def test_upcycle_noise_is_relative_and_seeded():
    dense = tiny_model(DENSE, vocab_size=300).train()
    a, b = upcycle(dense, 3, 1, noise=0.1, seed=5), upcycle(dense, 3, 1, noise=0.1, seed=5)
    w = dense.layers[0].ffn.w2.weight
    experts = a.layers[0].ffn.experts.w2
    assert torch.equal(experts, b.layers[0].ffn.experts.w2)  # same seed, same draw
    diff = experts - w
    assert not torch.equal(diff[0], diff[1])  # one draw per expert
    assert diff.std().item() == pytest.approx(0.1 * w.std().item(), rel=0.1)


def test_upcycle_cli_loads_in_transformers(tmp_path, tok300, capsys):
    from transformers import AutoModelForCausalLM

    dense_dir, dense = tiny_dense_dir(tmp_path / "dense", tok=tok300)
    out = tmp_path / "moe"
    assert cli.main(["upcycle", "--model", str(dense_dir), "--experts", "4", "--top-k", "2", "--out", str(out),
                     "--router", "random", "--seed", "3"]) == 0
    assert "4 experts, top-2" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (dense_dir / f).read_bytes()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, dense.eval()(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model(out)(x), dense(x), atol=1e-5, rtol=1e-5)


def test_upcycle_errors(tmp_path, tok300, capsys):
    dense_dir, _ = tiny_dense_dir(tmp_path / "dense", tok=tok300)
    assert cli.main(["upcycle", "--model", str(dense_dir), "--experts", "2", "--top-k", "3", "--out",
                     str(tmp_path / "x")]) == 2
    assert "--top-k must be between 1 and --experts (2)" in capsys.readouterr().err
    moe_dir = save_model(upcycle(load_model(dense_dir), 2, 1), tmp_path / "moe", tokenizer=tok300)
    r = call_cli(capsys, "upcycle", "--model", moe_dir, "--experts", "4", "--top-k", "1", "--out", tmp_path / "y")
    assert "already an MoE" in assert_one_line_error(r, "upcycle", 2)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("over, dtype, fmt", [({"noisy_gating": True}, None, "hf"),
                                              ({"tie_embeddings": True}, torch.bfloat16, "hf"), ({}, None, "mistral")])
def test_streamed_upcycle_equals_the_in_memory_one(tmp_path, tok300, over, dtype, fmt):
    """upcycle_dir (layer by layer, sharded output) writes what save_model(upcycle(load_model(...))) writes, bit for
    bit (noise and router draws included), from a HF or a Mistral-native directory, fp32 or bf16."""
    dense = tiny_model(DENSE, 0, vocab_size=300, **over)
    dense = dense.to(dtype) if dtype else dense
    src = save_model(dense, tmp_path / "dense", tokenizer=tok300, format=fmt)
    cfg = upcycle_dir(src, tmp_path / "streamed", 3, 2, noise=0.05, seed=4, max_shard_bytes=30_000)
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 2
    save_model(upcycle(load_model(src), 3, 2, noise=0.05, seed=4), tmp_path / "in-memory", tokenizer=tok300)
    a, b = read_safetensors(tmp_path / "streamed"), read_safetensors(tmp_path / "in-memory")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (tmp_path / "streamed/config.json").read_text() == (tmp_path / "in-memory/config.json").read_text()
    assert cfg == load_model(tmp_path / "streamed").cfg
