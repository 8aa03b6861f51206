"""mergekit-moe merges, ending in a real frankenMoE of two trained models.

The merge test trains a base model on a mix of two kinds of text (animal sentences, arithmetic), fine-tunes
one copy on each kind (by resuming the base run on that kind's data), merges the two with gate_mode hidden
and checks that tokens of each kind go to their own expert and that the merged model nearly matches each
fine-tune on its kind. Experts are fine-tunes of one base, as in mergekit practice: models trained apart do
not share a residual-stream basis, so one's FFN cannot work under the other's attention.
"""
import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import DENSE_CFG, animals, arithmetic, assert_one_line_error, call_cli, tiny_dense_dir
from tinymixtral import TinyMixtralError, cli
from tinymixtral.checkpoint import load_model, save_model
from tinymixtral.data import load_split, write_tokens
from tinymixtral.evaluate import evaluate
from tinymixtral.merging import degenerate_pairs, merge
from tinymixtral.tokenizer import load_tokenizer, train_bpe
from tinymixtral.train import TrainConfig, train
from tinymixtral.upcycling import upcycle

LOSS_BOUND = 1.05  # merged loss on a kind <= 5% above its source model's (measured: about 1-2%)


def prompts(docs: list[str], seed: int) -> list[str]:
    """Documents cut after a random number of words: the last token of a prompt is any kind of token."""
    r = random.Random(seed)
    return [" ".join(d.split()[:r.randint(3, len(d.split()))]) for d in docs]


def make_data(d, texts, tok):
    """A prepared data dir (as `tinymixtral prepare` writes) with a given tokenizer; 10% of docs for val."""
    d.mkdir()
    n_val = len(texts) // 10
    meta = {"tokenizer": "bpe", "vocab_size": tok.vocab_size, "dtype": "uint16", "bos_id": tok.bos_id,
            "eos_id": tok.eos_id}
    for split, part in (("train", texts[n_val:]), ("val", texts[:n_val])):
        counts = write_tokens(part, tok, d / f"{split}.bin", np.uint16, desc=split)
        meta.update({f"{split}_{k}": v for k, v in counts.items()})
    (d / "meta.json").write_text(json.dumps(meta))
    tok.save(d / "tokenizer")
    return d


# ---- merge: config checks on untrained models --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory, tok300):
    root = tmp_path_factory.mktemp("merge-cfg")
    tiny_dense_dir(root / "base", 0, tok300)
    tiny_dense_dir(root / "a", 1, tok300)
    tiny_dense_dir(root / "b", 2, tok300)
    tiny_dense_dir(root / "wide", 3, tok300, d_model=128)
    save_model(upcycle(load_model(root / "a"), 2, 1), root / "moe", tokenizer=tok300)
    return root


def config(root, **over):
    c = {"base_model": str(root / "base"), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
         "experts": [{"source_model": str(root / "a"), "positive_prompts": ["the cat sat"]},
                     {"source_model": str(root / "b"), "positive_prompts": ["1 + 2 = 3"]}]}
    return {**c, **over}


@pytest.mark.parametrize("over, message", [
    ({"experts_per_token": 3}, "experts_per_token must be an integer between 1 and the number of experts (2)"),
    ({"gate_mode": "hidden_avg"}, "gate_mode 'hidden_avg' is not supported"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ({"shared_experts": []}, "'shared_experts' (shared experts"),
    ({"architecture": "qwen"}, "architecture 'qwen' is not supported"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"base_model": "nowhere"}, "base_model: no model directory at"),
    ({"experts": []}, "'experts' must be a non-empty list"),
    ({"experts": [{"source_model": "a"}, {"source_model": "b"}]}, "experts[0] has no positive_prompts"),
    ({"experts": [{"source_model": "a", "positive_prompts": "x"}]}, "positive_prompts must be a list"),
    ({"experts": [{"source_model": "a", "positive_prompts": ["x"], "noise_scale": 0.1}]}, "noise_scale"),
    ({"experts": [{"source_model": "a", "positive_prompts": ["x"]}, {"source_model": "b", "positive_prompts": ["x"]}]},
     "every expert has the same prompts"),
    ({"experts": [{"source_model": "moe", "positive_prompts": ["x"]}]}, "is an MoE"),
    ({"experts": [{"source_model": "wide", "positive_prompts": ["x"]}]}, "has d_model=128 but the base has 64"),
])
def test_merge_config_errors(tiny_sources, monkeypatch, over, message):
    monkeypatch.chdir(tiny_sources)  # relative paths of a dict config start at the cwd
    with pytest.raises(TinyMixtralError) as e:
        merge(config(tiny_sources, **over))
    assert message in str(e.value)


def test_merge_cli_error_is_one_line(tiny_sources, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config(tiny_sources, experts_per_token=5)))
    line = assert_one_line_error(call_cli(capsys, "merge", path, "--out", tmp_path / "out"), "merge", 2)
    assert line.startswith("tinymixtral merge: error: merge config: experts_per_token")
    assert not (tmp_path / "out").exists()
    assert cli.main(["merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "merge config not found" in capsys.readouterr().err


def test_cheap_embed_random_dtype_and_degenerate_warning(tiny_sources, capsys):
    same = "cat " * 40
    m = merge(config(tiny_sources, gate_mode="cheap_embed", dtype="bfloat16", experts=[
        {"source_model": str(tiny_sources / "a"), "positive_prompts": [same]},
        {"source_model": str(tiny_sources / "b"), "positive_prompts": [same + "dog"]}]))
    assert next(m.parameters()).dtype == torch.bfloat16
    g0, g1 = (layer.ffn.router.weight.float() for layer in m.layers)
    assert torch.equal(g0, g1) and g0.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-2)
    err = capsys.readouterr().err
    assert "warning: layer 0: router vectors of experts 0 and 1 are nearly parallel" in err
    r = merge(config(tiny_sources, gate_mode="random", experts=[
        {"source_model": str(tiny_sources / "a")}, {"source_model": str(tiny_sources / "b")}]))
    assert r.layers[0].ffn.router.weight.std().item() == pytest.approx(1.0, rel=0.2)  # mergekit's randn
    pairs = degenerate_pairs(torch.tensor([[[1.0, 0.0], [0.99, 0.05], [0.0, 1.0]]]))
    assert pairs == [(0, 0, 1, pytest.approx(0.9987, abs=1e-3))]


# ---- merge: a real frankenMoE of two fine-tunes --------------------------------------------------------
@pytest.fixture(scope="module")
def franken(tmp_path_factory):
    root = tmp_path_factory.mktemp("franken")
    kinds = {"animals": animals(800, 1), "arithmetic": arithmetic(800, 2)}
    tok = train_bpe(kinds["animals"] + kinds["arithmetic"], 512)  # one tokenizer for both kinds
    mix = kinds["animals"] + kinds["arithmetic"]
    random.Random(0).shuffle(mix)
    data = {name: make_data(root / name, texts, tok) for name, texts in kinds.items()}
    base_cfg = TrainConfig(data=str(make_data(root / "mix", mix, tok)), out=str(root / "base"), batch_size=16,
                           seq_len=48, lr=1e-2, warmup_steps=10, max_steps=200, eval_interval=10**6, eval_batches=4,
                           log_interval=50, ckpt_interval=10**6, keep_last=1, seed=0, progress=False)
    train(base_cfg, DENSE_CFG)
    for name in kinds:  # fine-tune: continue the base run for 100 steps on one kind only
        shutil.copytree(root / "base", root / f"ft-{name}", symlinks=True)
        train(dataclasses.replace(base_cfg, data=str(data[name]), out=str(root / f"ft-{name}"), max_steps=300),
              DENSE_CFG, resume=True)
    yaml_cfg = {"base_model": "base/latest", "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
                "experts": [{"source_model": "ft-animals/latest", "positive_prompts": prompts(animals(24, 99), 5),
                             "negative_prompts": prompts(arithmetic(24, 98), 6)},
                            {"source_model": "ft-arithmetic/latest", "positive_prompts": prompts(arithmetic(24, 98), 6),
                             "negative_prompts": prompts(animals(24, 99), 5)}]}
    (root / "moe.yaml").write_text(yaml.safe_dump(yaml_cfg))  # paths relative to the YAML's folder
    assert cli.main(["merge", str(root / "moe.yaml"), "--out", str(root / "merged")]) == 0
    return root, data


@pytest.mark.slow
def test_merged_model_routes_each_kind_to_its_expert_and_keeps_its_loss(franken):
    root, data = franken
    merged = load_model(root / "merged", dtype=torch.float32)
    results = {}
    for e, name in enumerate(data):
        val, _ = load_split(data[name], "val")
        x = torch.from_numpy(val[:8 * 48].astype(np.int64)).view(8, 48)
        with torch.no_grad():
            merged(x)
        acc = [float((r.experts_NK[:, 0] == e).float().mean()) for r in merged.routing()]
        losses = {k: evaluate(m, val, 8, 48, "cpu", 4) for k, m in (
            ("merged", merged), ("source", load_model(root / f"ft-{name}/latest", dtype=torch.float32)),
            ("base", load_model(root / "base/latest", dtype=torch.float32)))}
        results[name] = (acc, losses)
    for layer in merged.layers:  # control: each kind sent to the other kind's expert
        layer.ffn.router.weight.data = layer.ffn.router.weight.data.flip(0)
    swapped = {name: evaluate(merged, load_split(data[name], "val")[0], 8, 48, "cpu", 4) for name in data}
    for name, (acc, losses) in results.items():  # shown with -s
        print(f"\n[merge] {name}: first choice = own expert in {', '.join(f'{a:.1%}' for a in acc)} of tokens "
              f"(layers 0..{len(acc) - 1}; mean {np.mean(acc):.1%}); loss merged {losses['merged']:.4f}, "
              f"source {losses['source']:.4f} ({losses['merged'] / losses['source'] - 1:+.1%}), base "
              f"{losses['base']:.4f}, routers swapped {swapped[name]:.4f}")
    for name, (acc, losses) in results.items():
        assert np.mean(acc) >= 0.7 and min(acc) >= 0.6, (name, acc)  # mean over layers >= 70%
        assert losses["merged"] <= LOSS_BOUND * losses["source"], (name, losses)
        assert swapped[name] > losses["merged"]  # the routing is what makes it work


@pytest.mark.slow
def test_merged_dir_is_a_hf_mixtral_with_the_base_tokenizer(franken):
    from transformers import AutoModelForCausalLM

    root, data = franken
    out = root / "merged"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (root / "base/latest" / f).read_bytes()
    text = "the cat sat on the mat. 3 + 4 = 7."
    assert load_tokenizer(out).encode(text) == load_tokenizer(data["animals"] / "tokenizer").encode(text)
    x = torch.from_numpy(load_split(data["arithmetic"], "val")[0][:64].astype(np.int64)).view(2, 32)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_model(out, dtype=torch.float32)(x), atol=1e-4, rtol=1e-4)
    base = load_model(root / "base/latest")
    merged = load_model(out)
    assert torch.equal(merged.layers[1].attn.wqkv.weight, base.layers[1].attn.wqkv.weight)  # attention from base
    src = load_model(root / "ft-arithmetic/latest")
    assert torch.equal(merged.layers[1].ffn.experts.w13[1], src.layers[1].ffn.w13.weight)  # expert 1 = source 1
