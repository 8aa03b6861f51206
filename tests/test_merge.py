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
from tinymixtral.merging import degenerate_pairs, merge, prompt_ids
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
def test_merge_config_errors(tiny_sources, monkeypatch, tmp_path, over, message):
    monkeypatch.chdir(tiny_sources)  # relative paths of a dict config start at the cwd
    with pytest.raises(TinyMixtralError) as e:
        merge(config(tiny_sources, **over), tmp_path / "out")
    assert message in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_merge_cli_error_is_one_line(tiny_sources, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config(tiny_sources, experts_per_token=5)))
    line = assert_one_line_error(call_cli(capsys, "merge", path, "--out", tmp_path / "out"), "merge", 2)
    assert line.startswith("tinymixtral merge: error: merge config: experts_per_token")
    assert not (tmp_path / "out").exists()
    assert cli.main(["merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "merge config not found" in capsys.readouterr().err


def test_cheap_embed_random_dtype_and_degenerate_warning(tiny_sources, tmp_path, capsys):
    same = "cat " * 40
    merge(config(tiny_sources, gate_mode="cheap_embed", dtype="bfloat16", experts=[
        {"source_model": str(tiny_sources / "a"), "positive_prompts": [same]},
        {"source_model": str(tiny_sources / "b"), "positive_prompts": [same + "dog"]}]), tmp_path / "m")
    m = load_model(tmp_path / "m")
    assert next(m.parameters()).dtype == torch.bfloat16
    assert json.loads((tmp_path / "m/config.json").read_text())["dtype"] == "bfloat16"  # as mergekit writes it
    g0, g1 = (layer.ffn.router.weight.float() for layer in m.layers)
    assert torch.equal(g0, g1) and g0.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-2)
    err = capsys.readouterr().err
    assert "warning: layer 0: router vectors of experts 0 and 1 are nearly parallel" in err
    merge(config(tiny_sources, gate_mode="random", experts=[
        {"source_model": str(tiny_sources / "a")}, {"source_model": str(tiny_sources / "b")}]), tmp_path / "r")
    r = load_model(tmp_path / "r")
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


# ---- merge: streamed, from any directory layout, with mergekit's prompt ids ---------------------------
def test_streamed_merge_copies_sources_from_hf_and_native_dirs(tiny_sources, tmp_path):
    """Base tensors and experts are the sources' bit for bit (cast to dtype), sharded output included, with an
    expert given in Mistral's native layout; layer 0's router is the last tokens' embeddings, as mergekit's."""
    save_model(load_model(tiny_sources / "b"), tmp_path / "b-native", format="mistral")
    c = config(tiny_sources, dtype="bfloat16")
    c["experts"][1]["source_model"] = str(tmp_path / "b-native")
    c["experts"][0]["positive_prompts"] = ["the cat sat", "a dog"]
    cfg = merge(c, tmp_path / "m", max_shard_bytes=20_000)
    assert len(list((tmp_path / "m").glob("model-*-of-*.safetensors"))) > 2
    assert cfg.sliding_window is None and cfg.n_experts == 2 and cfg.top_k == 1
    m = load_model(tmp_path / "m")
    base, a, b = (load_model(tiny_sources / n) for n in ("base", "a", "b"))
    bf16 = torch.bfloat16
    assert torch.equal(m.embed.weight, base.embed.weight.to(bf16))
    for i in range(cfg.n_layers):
        assert torch.equal(m.layers[i].attn.wqkv.weight, base.layers[i].attn.wqkv.weight.to(bf16))
        assert torch.equal(m.layers[i].ffn_norm.weight, base.layers[i].ffn_norm.weight.to(bf16))
        for e, src in enumerate((a, b)):
            assert torch.equal(m.layers[i].ffn.experts.w13[e], src.layers[i].ffn.w13.weight.to(bf16))
            assert torch.equal(m.layers[i].ffn.experts.w2[e], src.layers[i].ffn.w2.weight.to(bf16))
    tok = load_tokenizer(tiny_sources / "base")
    last = [prompt_ids(tok, tiny_sources / "base", p)[-1] for p in c["experts"][0]["positive_prompts"]]
    v = base.embed.weight[last].to(bf16).sum(0) / len(last)  # the hidden state entering layer 0, in bf16
    v = v / v.norm().clamp(min=1e-8)
    torch.testing.assert_close(m.layers[0].ffn.router.weight[0], v, atol=0, rtol=0)


@pytest.mark.parametrize("split", [True, False])
def test_prompt_ids_are_mergekits_tokenizer_call(tiny_sources, tmp_path, split):
    """mergekit tokenizes bos_token + prompt with add_special_tokens=False: with split_special_tokens (ours)
    "<s>" is text, without it (most Hub tokenizers) it is BOS."""
    from transformers import AutoTokenizer

    d = tmp_path / "tok"
    shutil.copytree(tiny_sources / "base", d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "split_special_tokens": split}))
    hf = AutoTokenizer.from_pretrained(d)
    ours = load_tokenizer(d)
    for p in ["the cat sat", " 3 + 4 = 7", "x"]:
        want = hf([hf.bos_token + p], add_special_tokens=False)["input_ids"][0]
        assert prompt_ids(ours, d, p) == want
        assert (want[0] == ours.bos_id) == (not split)


PEAK_SCRIPT = """
import sys, torch
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
from tinymixtral.merging import merge
from tinymixtral.upcycling import upcycle_dir
base = status("VmRSS")  # after the imports; VmHWM, not ru_maxrss, which a child inherits from its parent
if sys.argv[1] == "upcycle":
    upcycle_dir(sys.argv[2], sys.argv[3], 4, 2, noise=0.01)
else:
    merge(sys.argv[2], sys.argv[3])
print(status("VmHWM") - base)
"""


@pytest.mark.slow
def test_merge_and_upcycle_hold_one_layer_not_the_models(tmp_path):
    """Peak memory in a fresh process: upcycle holds about one layer's experts; merge the base in bf16 (for its
    hidden-state gates) or one layer, never the sources or the output."""
    import os
    import subprocess
    import sys

    from conftest import tiny_model
    from tinymixtral.tokenizer import train_bpe

    over = dict(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=4096, max_seq_len=256)
    tok = train_bpe(animals(50, 0) + arithmetic(50, 0), 300)
    for i, name in enumerate(("base", "e0", "e1", "e2")):  # ~33M parameters: 133 MB each in fp32
        save_model(tiny_model(DENSE_CFG, i, **over), tmp_path / name, tokenizer=tok, max_shard_bytes=64 * 2**20)
    dense = sum(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    ffn_layer = 3 * over["d_model"] * over["d_ff"] * 4  # one dense layer's FFN in fp32
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump({
        "base_model": "base", "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
        "experts": [{"source_model": f"e{i}", "positive_prompts": [p]}
                    for i, p in enumerate(["cat", "1 + 2", "dog"])]}))

    def peak(*args):
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, args)], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    up = peak("upcycle", tmp_path / "base", tmp_path / "up")
    out = sum(f.stat().st_size for f in (tmp_path / "up").glob("*.safetensors"))
    mg = peak("merge", tmp_path / "moe.yaml", tmp_path / "merged")
    merged = sum(f.stat().st_size for f in (tmp_path / "merged").glob("*.safetensors"))
    print(f"\n[stream] dense {dense / 1e6:.0f} MB; upcycle x4 (output {out / 1e6:.0f} MB) peak {up / 1e6:.0f} MB; "
          f"merge of 3 (output {merged / 1e6:.0f} MB) peak {mg / 1e6:.0f} MB; one layer's experts "
          f"{4 * ffn_layer / 1e6:.0f} MB")
    assert up <= 2 * 4 * ffn_layer + 50e6, (up, ffn_layer)  # the layer's experts (+ the fp32 noise draw)
    assert mg <= dense / 2 + 2 * ffn_layer + 80e6, (mg, dense)  # the bf16 base, a tensor or two, the forward


def test_merge_and_upcycle_refuse_a_source_without_a_weight(tiny_sources, tmp_path, capsys):
    """A source missing a tensor ends in one line naming it, before anything is written."""
    from conftest import rewrite_weights

    shutil.copytree(tiny_sources / "b", tmp_path / "b")
    rewrite_weights(tmp_path / "b", lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    c = config(tiny_sources)
    c["experts"][1]["source_model"] = str(tmp_path / "b")
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(c))
    line = assert_one_line_error(call_cli(capsys, "merge", tmp_path / "moe.yaml", "--out", tmp_path / "m"), "merge", 2)
    assert "model.layers.1.mlp.down_proj.weight is missing or misshapen in" in line and str(tmp_path / "b") in line
    r = call_cli(capsys, "upcycle", "--model", tmp_path / "b", "--experts", "2", "--top-k", "1", "--out", tmp_path / "u")
    line = assert_one_line_error(r, "upcycle", 2)
    assert "missing 1 weight(s): model.layers.1.mlp.down_proj.weight" in line
    assert not (tmp_path / "m").exists() and not (tmp_path / "u").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_native_v3_tokenizer_is_used_and_carried(tmp_path, capsys):
    """Mistral-native sources with tokenizer.model.v3: cheap_embed gates read the prompts with it, the output carries
    it, and an expert with another tokenizer (v1) gets the warning."""
    from conftest import mistral_tokenizer_file

    for i, (name, version) in enumerate((("base", "v3"), ("a", "v3"), ("b", "v1"))):
        d, model = tiny_dense_dir(tmp_path / "src" / name, i, vocab_size=32768)
        save_model(model, d, format="mistral")
        shutil.copy(mistral_tokenizer_file(version), d / f"tokenizer.model.{version}")
    merge(config(tmp_path / "src", gate_mode="cheap_embed"), tmp_path / "m")
    assert "experts[1].source_model" in capsys.readouterr().err.split("different tokenizer")[0].splitlines()[-1]
    assert (tmp_path / "m" / "tokenizer.model.v3").read_bytes() == mistral_tokenizer_file("v3").read_bytes()
    assert load_tokenizer(tmp_path / "m").instruct_format == "v3"
