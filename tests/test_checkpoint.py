"""Model directories: exact round trips, sharding, atomic saves, tokenizer files, and bad input."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tinymixtral
from tinymixtral import ModelConfig, TinyMixtralError, Transformer
from tinymixtral import checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = dict(vocab_size=67, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=64, rope_theta=1e4)
CONFIGS = {
    "moe": ModelConfig(**BASE, n_experts=4, top_k=2, sliding_window=8, router_aux_loss_coef=0.02),
    "moe-tied": ModelConfig(**BASE, n_experts=3, top_k=1, tie_embeddings=True, router_aux_loss_coef=0.01),
    # ours-only options travel in config.json too, and the noisy-gating weights in the safetensors
    "moe-noisy": ModelConfig(**BASE, n_experts=4, top_k=2, noisy_gating=True, capacity_factor=1.25,
                             router_z_loss_coef=0.001, router_aux_loss_coef=0.01, router_jitter_noise=0.1),
    "dense": ModelConfig(**BASE, n_experts=0, sliding_window=16),
}


@torch.no_grad()
def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)  # not all ones, so a dropped norm shows
    return model.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def keys_in(directory) -> dict[str, str]:
    """key -> file, over every safetensors file in the directory."""
    where = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), framework="pt") as st:
                for k in st.keys():
                    assert k not in where, f"{k} in two files"
                    where[k] = f
    return where


def snapshot(directory) -> dict[str, bytes]:
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


def rewrite_weights(directory, edit):
    """Load model.safetensors (copied out of the mmap), let `edit` change the dict, write it back."""
    path = os.path.join(directory, "model.safetensors")
    sd = {k: v.clone() for k, v in load_file(path).items()}
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_config(directory, edit):
    path = os.path.join(directory, "config.json")
    d = json.load(open(path))
    edit(d)
    json.dump(d, open(path, "w"))


@pytest.fixture
def saved(tmp_path):
    """A saved MoE model directory and its model."""
    model = make_model(CONFIGS["moe"])
    tinymixtral.save_model(model, tmp_path / "m")
    return tmp_path / "m", model


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_is_exact(name, tmp_path):
    model = make_model(CONFIGS[name])
    out = tinymixtral.save_model(model, tmp_path / "m")
    assert out == tmp_path / "m"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(out))
    loaded = tinymixtral.load_model(out)
    assert_same_weights(model, loaded)
    assert not loaded.training
    x = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loaded_config_equals_saved(name, tmp_path):
    cfg = CONFIGS[name]
    tinymixtral.save_model(make_model(cfg), tmp_path / "m")
    assert tinymixtral.load_model(tmp_path / "m").cfg == cfg
    assert ModelConfig.load(tmp_path / "m") == cfg


def test_tied_embeddings_share_storage_and_write_no_head(tmp_path):
    model = make_model(CONFIGS["moe-tied"])
    assert model.lm_head.weight is model.embed.weight
    tinymixtral.save_model(model, tmp_path / "m")
    keys = keys_in(tmp_path / "m")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.load(open(tmp_path / "m" / "config.json"))["tie_word_embeddings"] is True
    loaded = tinymixtral.load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.embed.weight
    assert loaded.lm_head.weight.untyped_storage().data_ptr() == loaded.embed.weight.untyped_storage().data_ptr()
    assert sum(1 for _ in loaded.parameters()) == sum(1 for _ in model.parameters())  # counted once
    # trained further, the head follows the embedding
    with torch.no_grad():
        loaded.embed.weight[0, 0] += 1.0
    assert torch.equal(loaded.lm_head.weight, loaded.embed.weight)


def test_bf16_weights_keep_their_dtype(tmp_path):
    model = make_model(CONFIGS["moe"]).to(torch.bfloat16)
    tinymixtral.save_model(model, tmp_path / "m")
    loaded = tinymixtral.load_model(tmp_path / "m")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert_same_weights(model, loaded)
    as_fp32 = tinymixtral.load_model(tmp_path / "m", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())


# ---- sharding --------------------------------------------------------------------------------------
def test_sharded_save_loads_exactly(tmp_path):
    model = make_model(CONFIGS["moe"])
    tinymixtral.save_model(model, tmp_path / "m", max_shard_bytes=8 * 1024)
    files = sorted(os.listdir(tmp_path / "m"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert len(shards) > 2
    n = len(shards)
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for f in shards:
        assert re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)

    index = json.load(open(tmp_path / "m" / "model.safetensors.index.json"))
    where = keys_in(tmp_path / "m")
    assert index["weight_map"] == where  # every key, each in the file the index names
    sd = {k: load_file(tmp_path / "m" / f)[k] for k, f in where.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(where) == set(checkpoint.to_hf(model.state_dict(), model.cfg))

    loaded = tinymixtral.load_model(tmp_path / "m")
    assert_same_weights(model, loaded)


def test_sharded_save_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    model = make_model(CONFIGS["moe"])
    tinymixtral.save_model(model, tmp_path / "m", max_shard_bytes=8 * 1024)
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=0)


def test_index_naming_a_missing_shard(tmp_path):
    tinymixtral.save_model(make_model(CONFIGS["moe"]), tmp_path / "m", max_shard_bytes=8 * 1024)
    victim = sorted(f for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "m" / victim)
    with pytest.raises(TinyMixtralError, match=re.escape(victim)):
        tinymixtral.load_model(tmp_path / "m")


def test_corrupt_index(tmp_path):
    tinymixtral.save_model(make_model(CONFIGS["moe"]), tmp_path / "m", max_shard_bytes=8 * 1024)
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(TinyMixtralError, match="not a valid safetensors index"):
        tinymixtral.load_model(tmp_path / "m")


# ---- atomic save -----------------------------------------------------------------------------------
def test_save_over_existing_dir_leaves_no_temporaries_or_stale_files(tmp_path):
    first, second = make_model(CONFIGS["moe"], seed=1), make_model(CONFIGS["moe"], seed=2)
    tinymixtral.save_model(first, tmp_path / "m", max_shard_bytes=8 * 1024)  # sharded ...
    (tmp_path / "m" / "notes.txt").write_text("user file")
    tinymixtral.save_model(second, tmp_path / "m")  # ... then one file: no stale shards or index survive
    assert os.listdir(tmp_path) == ["m"]
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_same_weights(second, tinymixtral.load_model(tmp_path / "m"))


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_content(exc, tmp_path, monkeypatch):
    old = make_model(CONFIGS["moe"], seed=1)
    tinymixtral.save_model(old, tmp_path / "m")
    before = snapshot(tmp_path / "m")

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(checkpoint, "_write_shards", boom)
    with pytest.raises(type(exc)):
        tinymixtral.save_model(make_model(CONFIGS["moe"], seed=2), tmp_path / "m")
    assert os.listdir(tmp_path) == ["m"]  # no .m.tmp-*/.m.old-* left behind
    assert snapshot(tmp_path / "m") == before
    monkeypatch.undo()
    assert_same_weights(old, tinymixtral.load_model(tmp_path / "m"))


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_write_shards", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        tinymixtral.save_model(make_model(CONFIGS["moe"]), tmp_path / "m")
    assert os.listdir(tmp_path) == []


# ---- tokenizer files -------------------------------------------------------------------------------
def test_tokenizer_directory_files_are_copied(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tok / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (tok / "unrelated.txt").write_text("not a tokenizer file")
    tinymixtral.save_model(make_model(CONFIGS["moe"]), tmp_path / "m", tokenizer=tok)
    for f in ("tokenizer_config.json", "tokenizer.json"):
        assert (tmp_path / "m" / f).read_bytes() == (tok / f).read_bytes()
    assert not (tmp_path / "m" / "unrelated.txt").exists()
    tinymixtral.load_model(tmp_path / "m")  # still a loadable model directory


def test_tokenizer_directory_without_files_fails_cleanly(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(TinyMixtralError, match="no tokenizer files"):
        tinymixtral.save_model(make_model(CONFIGS["moe"]), tmp_path / "out" / "m", tokenizer=tmp_path / "tok")
    assert os.listdir(tmp_path / "out") == []


# ---- bad input ---------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(TinyMixtralError, match="model directory not found"):
        tinymixtral.load_model(tmp_path / "nope")


def test_file_instead_of_directory(saved):
    path, _ = saved
    with pytest.raises(TinyMixtralError, match="not a model directory"):
        tinymixtral.load_model(path / "model.safetensors")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinyMixtralError, match="config file not found"):
        tinymixtral.load_model(tmp_path / "empty")


def test_directory_without_weights(saved):
    path, _ = saved
    os.remove(path / "model.safetensors")
    with pytest.raises(TinyMixtralError, match=r"no model\.safetensors"):
        tinymixtral.load_model(path)


def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("tinymixtral tried to unpickle a file")

    for owner, name in [(torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(owner, name, refuse)


def test_only_pickled_weights_are_refused_without_unpickling(saved, monkeypatch):
    path, model = saved
    os.remove(path / "model.safetensors")
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    _no_unpickling(monkeypatch)
    with pytest.raises(TinyMixtralError, match=r"pickled weights \(pytorch_model\.bin\).*never unpickles"):
        tinymixtral.load_model(path)


def test_pickle_file_as_path_is_refused_without_unpickling(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    _no_unpickling(monkeypatch)
    with pytest.raises(TinyMixtralError, match="is a pickle, not a model directory"):
        tinymixtral.load_model(tmp_path / "model.pt")


def test_truncated_safetensors(saved):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TinyMixtralError, match=r"model\.safetensors: not a valid safetensors file"):
        tinymixtral.load_model(path)


@pytest.mark.parametrize("junk", [b"", b"\x00" * 7, os.urandom(4096), b"\xff" * 8 + b"{}"])
def test_garbage_safetensors(saved, junk):
    path, _ = saved
    (path / "model.safetensors").write_bytes(junk)
    with pytest.raises(TinyMixtralError, match="not a valid safetensors file"):
        tinymixtral.load_model(path)


def test_config_of_another_model_type(saved):
    path, _ = saved
    edit_config(path, lambda d: d.update(model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(TinyMixtralError, match="model_type 'llama'"):
        tinymixtral.load_model(path)


def test_config_with_unknown_field(saved):
    path, _ = saved
    edit_config(path, lambda d: d.update(my_new_knob=3))
    with pytest.raises(TinyMixtralError, match="unknown field 'my_new_knob'"):
        tinymixtral.load_model(path)


def test_config_not_json(saved):
    path, _ = saved
    (path / "config.json").write_text("{oops")
    with pytest.raises(TinyMixtralError, match="not valid JSON"):
        tinymixtral.load_model(path)


def test_weights_of_the_wrong_shape(saved):
    path, _ = saved
    edit_config(path, lambda d: d.update(hidden_size=48))  # head_dim is explicit, so the config stays valid
    with pytest.raises(TinyMixtralError, match=r"model\.embed_tokens\.weight has shape \(67, 32\).*\(67, 48\)"):
        tinymixtral.load_model(path)


@pytest.mark.parametrize("key,shape", [
    ("model.layers.1.block_sparse_moe.experts.2.w1.weight", (39, 32)),  # one expert of a stacked group
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", (32, 41)),
    ("model.layers.0.self_attn.k_proj.weight", (16, 31)),  # one of the fused q/k/v
    ("model.layers.1.block_sparse_moe.gate.weight", (5, 32)),
])
def test_one_misshapen_weight_is_named(saved, key, shape):
    path, _ = saved
    rewrite_weights(path, lambda sd: sd.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(TinyMixtralError, match=re.escape(f"{key} has shape {shape}")):
        tinymixtral.load_model(path)


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight",
                                 "model.layers.0.block_sparse_moe.experts.3.w3.weight",
                                 "lm_head.weight", "model.norm.weight"])
def test_missing_weight_is_named(saved, key):
    path, _ = saved
    rewrite_weights(path, lambda sd: sd.pop(key))
    with pytest.raises(TinyMixtralError, match=rf"missing 1 weight\(s\): {re.escape(key)}$"):
        tinymixtral.load_model(path)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_norm.weight", "model.layers.2.input_layernorm.weight",
                                 "model.layers.0.block_sparse_moe.experts.4.w1.weight"])
def test_unexpected_weight_is_named(saved, key):
    path, _ = saved
    rewrite_weights(path, lambda sd: sd.__setitem__(key, torch.zeros(32)))
    with pytest.raises(TinyMixtralError, match=rf"unexpected weight\(s\): {re.escape(key)}$"):
        tinymixtral.load_model(path)


# ---- CLI -------------------------------------------------------------------------------------------
def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tinymixtral", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_one_line_error(proc, command="params"):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"tinymixtral {command}: error:"), lines[0]
    return lines[0]


def test_cli_params_missing_model_dir(tmp_path):
    line = assert_one_line_error(run_cli("params", "--model", str(tmp_path / "nope")))
    assert "nope" in line


def test_cli_params_config_of_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    line = assert_one_line_error(run_cli("params", "--config", str(tmp_path / "config.json")))
    assert "llama" in line


def test_cli_params_on_a_saved_model(saved):
    path, model = saved
    proc = run_cli("params", "--model", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"] == model.num_params()


def test_misshapen_fused_expert_weight_is_named_as_in_the_file(saved):
    """transformers 5's fused layout (mlp.experts.gate_up_proj): a bad tensor is named by its key in the file."""
    path, model = saved
    ours = model.layers[0].ffn

    def to_fused(sd):
        for k in [k for k in sd if k.startswith("model.layers.0.block_sparse_moe.")]:
            sd.pop(k)
        sd["model.layers.0.mlp.gate.weight"] = ours.router.weight.detach().clone()
        sd["model.layers.0.mlp.experts.down_proj"] = ours.experts.w2.detach().clone()
        sd["model.layers.0.mlp.experts.gate_up_proj"] = ours.experts.w13.detach()[:, :-2].clone()  # [4, 78, 32]

    rewrite_weights(path, to_fused)
    with pytest.raises(TinyMixtralError, match=re.escape("model.layers.0.mlp.experts.gate_up_proj has shape (4, 78, 32)")):
        tinymixtral.load_model(path)
