"""`tinymixtral export`: GGUF files that llama.cpp itself (llama-cpp-python, built from source by the test extra)
runs as we do: the same token ids, the same prompt logits, the same greedy tokens."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, call_cli, edit_config, make_docs, mistral_tokenizer_file, tiny_model

from tinymixtral import save_model
from tinymixtral.bench_llama import NO_AMX_HINT, llama_cpp_runs_quantized
from tinymixtral.generation import generate
from tinymixtral.instruct import chat_template, turn_ids
from tinymixtral.quantize import quantize_model
from tinymixtral.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[test]')")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]' "
                                "builds llama.cpp from source)")

TEXTS = ["Once upon a time", " Lily ran to the park.", "", "  two  spaces\tand a tab\n\nnew lines\n",
         "I've been 'told he's there, we'LL see.", "3.14 and 12345 and 1,000,000", "Café, naïve, 日本 🙂!",
         "<s> is text here </s>", "end with spaces   "]
# Tolerances, as a fraction of the prompt's logit range (max - min over the vocabulary and positions). Measured on
# the three models: f32 5e-5 to 7e-5, f16 1.4e-4 to 2.3e-4 (llama.cpp rounds weights and activations to 11 bits),
# q8_0 1.8e-3 to 8e-3 (weights to 8 bits per block of 32, and activations to 8 bits).
TOL = {"f32": 1e-3, "f16": 1e-3, "q8_0": 2e-2}


def llama(path, n_ctx=0):
    """llama.cpp on a GGUF file; a quantized one only where llama.cpp runs those (a build whose AMX kernels fault
    here would take pytest down: the failure names the rebuild instead)."""
    quantized = read(path)[0]["general.file_type"] not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16)
    if quantized and not llama_cpp_runs_quantized():
        pytest.fail(f"this llama.cpp build crashes on quantized GGUF files here: {NO_AMX_HINT}")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding through llama.cpp's KV cache: one token per eval after the prompt."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@torch.no_grad()
def ours_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].float().numpy()


def export(capsys, model_dir, out, *flags) -> str:
    proc = call_cli(capsys, "export", "--model", model_dir, "--gguf", out, *flags)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---- the three models -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe_moe(trained, tmp_path_factory):
    """The 40-step trained MoE (our 300-token BPE, vocab 320), its context widened to 256 for 64 new tokens."""
    run, _, _ = trained
    d = tmp_path_factory.mktemp("bpe") / "m"
    shutil.copytree((run / "latest").resolve(), d)
    edit_config(d, lambda c: c.update(max_position_embeddings=256))
    from tinymixtral import load_model
    return d, load_model(d)


def mistral_dir(tmp_path_factory, name, steps=30, **cfg):
    """A tiny model with Mixtral's own 32000-token SentencePiece tokenizer, trained a little on template stories.

    Trained, not random: a random model's top two logits over 32,000 tokens are often closer than f16 rounding, so
    greedy decoding in f16 would flip on ties that a trained model does not have.
    """
    tok = load_tokenizer("mistral")
    model = tiny_model(vocab_size=32000, max_seq_len=4096, **cfg).train()
    rows = [ids[:32] for ids in tok.encode_batch(make_docs(400), bos=True) if len(ids) >= 32]
    data = torch.tensor(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (8,), generator=g)]
        loss = model(x[:, :-1], x[:, 1:])[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    d = tmp_path_factory.mktemp(name) / "m"
    save_model(model, d, tokenizer=tok)
    return d, model


@pytest.fixture(scope="module")
def mistral_moe(tmp_path_factory):
    """MoE: head_dim 16 != d_model / heads, a sliding window of 128 (the exported context), top-2 of 4."""
    return mistral_dir(tmp_path_factory, "moe", d_model=48, head_dim=16, sliding_window=128)


@pytest.fixture(scope="module")
def mistral_dense(tmp_path_factory):
    """Dense (Mistral): tied embeddings, no window, 4 kv heads of 4."""
    return mistral_dir(tmp_path_factory, "dense", n_experts=0, n_kv_heads=4, tie_embeddings=True)


MODELS = ["bpe_moe", "mistral_moe", "mistral_dense"]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """name -> (model dir, our model, {type: gguf path}), each type exported once (lazily)."""
    cache = {}

    def get(name, type):
        d, model = request.getfixturevalue(name)
        key = (name, type)
        if key not in cache:
            from tinymixtral.export import export_gguf
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{type}.gguf"
            export_gguf(d, out, type)
            cache[key] = out
        return d, model, cache[key]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_same_token_ids(name, exported):
    d, _, path = exported(name, "f32")
    tok, llm = load_tokenizer(d), llama(path)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, bos=True), text
    ids = tok.encode(" ".join(TEXTS), bos=True)  # llama-cpp-python drops the space SentencePiece puts after BOS
    assert llm.detokenize(ids).decode() == tok.decode(ids)  # llama.cpp's pieces put back together


@pytest.mark.parametrize("type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", MODELS)
def test_prompt_logits_agree(name, type, exported):
    d, model, path = exported(name, type)
    ids = load_tokenizer(d).encode("Once upon a time, Lily and Ben ran to the park. They saw a big dog!", bos=True)
    ours, theirs = ours_logits(model, ids), llama_logits(llama(path), ids)
    rel = np.abs(ours - theirs).max() / (ours.max() - ours.min())
    print(f"{name} {type}: max |diff| = {rel:.2e} of the logit range")
    assert rel <= TOL[type], f"{name} {type}: max |diff| = {rel:.2e} of the logit range"
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= (1.0 if type == "f32" else 0.9)


@pytest.mark.parametrize("type", ["f32", "f16"])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_64_tokens_identical(name, type, exported):
    d, model, path = exported(name, type)
    prompt = load_tokenizer(d).encode("Once upon a time", bos=True)
    ours = generate(model, torch.tensor([prompt]), 64)[0, len(prompt):].tolist()
    assert llama_greedy(llama(path), prompt, 64) == ours


# ---- the file itself ----------------------------------------------------------------------------------
def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def test_metadata_and_tensors_as_llama_cpp_converter_writes_them(exported):
    _, model, path = exported("mistral_moe", "q8_0")
    cfg = model.cfg
    f, t = read(path)
    expect = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 128,
              "llama.embedding_length": 48, "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 1e6, "llama.expert_count": 4,
              "llama.expert_used_count": 2, "llama.attention.key_length": 16, "llama.attention.value_length": 16,
              "llama.rope.dimension_count": 16, "llama.vocab_size": 32000, "general.file_type": 7,
              "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    assert {k: f.get(k) for k in expect} == pytest.approx(expect)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.scores"]) == 32000
    Q = gguf.GGMLQuantizationType
    assert t["blk.1.ffn_down_exps.weight"].tensor_type == Q.Q8_0
    assert t["blk.1.ffn_gate_exps.weight"].tensor_type == Q.F16  # rows of 48: no whole Q8_0 blocks (the converter's rule)
    assert list(t["blk.1.ffn_down_exps.weight"].shape) == [64, 48, 4]  # ggml order: [F, D, E]
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        assert t[name].tensor_type == Q.F32, name
    assert "output.weight" in t and "blk.0.ffn_gate.weight" not in t
    # q rows are llama.cpp's interleaved pairs: rows (2j, 2j+1) of a head are HF's (j, j + C/2)
    _, _, f32 = exported("mistral_moe", "f32")
    q = read(f32)[1]["blk.0.attn_q.weight"].data
    hf_q = model.layers[0].attn.wqkv.weight[:64].detach().numpy()
    assert np.array_equal(q[0], hf_q[0]) and np.array_equal(q[1], hf_q[8]) and np.array_equal(q[2], hf_q[1])


def test_dense_tied_and_bpe_files(exported):
    f, t = read(exported("mistral_dense", "f16")[2])
    assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= set(t)
    assert not any("exps" in n or "gate_inp" in n for n in t) and "llama.expert_count" not in f
    assert f["llama.context_length"] == 4096  # no window: nothing to cap
    f, _ = read(exported("bpe_moe", "f32")[2])
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == 320 and f["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert len(f["tokenizer.ggml.merges"]) > 0 and f["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL


def test_window_caps_the_context_with_one_line(capsys, mistral_moe, tmp_path):
    d, _ = mistral_moe
    out = export(capsys, d, tmp_path / "a.gguf")
    assert out.splitlines()[0].startswith("context length capped at the sliding window (128 tokens)")
    assert read(tmp_path / "a.gguf")[0]["llama.context_length"] == 128
    out = export(capsys, d, tmp_path / "b.gguf", "--full-context", "--type", "q4_0")
    assert "capped" not in out and read(tmp_path / "b.gguf")[0]["llama.context_length"] == 4096
    ids = load_tokenizer(d).encode("Once upon a time", bos=True)
    assert llama_logits(llama(tmp_path / "b.gguf"), ids).shape == (len(ids), 32000)  # q4_0 loads and runs


def test_native_v3_tokenizer_has_control_tokens(capsys, tmp_path):
    """A Mistral-native directory with tokenizer.model.v3: its control pieces ([INST], [/INST], ...) are CONTROL
    tokens in the file, so llama.cpp reads a v3 chat turn's markers as their ids and the ids equal ours."""
    d = tmp_path / "m"
    save_model(tiny_model(vocab_size=32768, n_layers=1), d, format="mistral")
    shutil.copy(mistral_tokenizer_file("v3"), d / "tokenizer.model.v3")
    export(capsys, d, tmp_path / "v3.gguf")
    types = read(tmp_path / "v3.gguf")[0]["tokenizer.ggml.token_type"]
    T = gguf.TokenType
    assert len(types) == 32768 and list(types[:6]) == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL]
    tok = load_tokenizer(d)
    llm = llama_cpp.Llama(str(tmp_path / "v3.gguf"), vocab_only=True, verbose=False)
    for system in (None, "be brief"):
        ours = turn_ids(tok, "the cat sat", system, bos=True)
        assert ours[:2] == [1, 3] and ours[-1] == 4
        assert llm.tokenize(chat_template("the cat sat", system, "v3").encode(), add_bos=True, special=True) == ours
    assert 3 not in llm.tokenize(b"[INST] hi", add_bos=False, special=False)  # without parse_special: text


def test_bad_input_one_line_no_file(capsys, mistral_moe, tmp_path):
    d, model = mistral_moe
    out = tmp_path / "x.gguf"
    qdir = tmp_path / "q"
    save_model(quantize_model(model, 8), qdir, tokenizer=d)
    no_tok = tmp_path / "no-tok"
    save_model(model, no_tok)
    cases = [(d, ["--type", "q5_k"], "unsupported GGUF type 'q5_k'"),
             (qdir, [], "tinymixtral-quantized model (int8)"),
             (no_tok, [], "no tokenizer"),
             (tmp_path / "missing", [], "model directory not found")]
    for src, flags, msg in cases:
        proc = call_cli(capsys, "export", "--model", src, "--gguf", out, *flags)
        assert msg in assert_one_line_error(proc, "export", 2)
        assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".x.gguf*")) == []
    taken = tmp_path / "taken.gguf"  # an existing directory as the output: refused before anything is written
    taken.mkdir()
    proc = call_cli(capsys, "export", "--model", d, "--gguf", taken)
    assert "is a directory" in assert_one_line_error(proc, "export", 2)
    assert list(taken.iterdir()) == [] and list(tmp_path.glob(".taken.gguf*")) == []
