"""KV cache and generation: incremental decoding equals the full forward pass, the rolling buffer stays
at W slots, ragged batches equal single rows, and greedy text equals transformers' generate."""

import pytest
import torch

import tinymixtral.generation as gen_mod
from tinymixtral import TinyMixtralError, save_model
from tinymixtral.cache import KVCache
from tinymixtral.config import ModelConfig
from tinymixtral.generation import apply_repetition_penalty, generate, sample, stream
from tinymixtral.model.transformer import Transformer


def tiny(window=8, n_experts=4, layers=2, vocab=97, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2, d_ff=48,
                      n_experts=n_experts, top_k=2 if n_experts else 2, sliding_window=window, max_seq_len=512, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a norm bug cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("window", [8, None])
@pytest.mark.parametrize("pieces", [[1] * 40, [5, 7] + [1] * 28, [8, 8, 8, 8, 8], [3, 8, 1, 8, 6, 1, 8, 5]])
def test_incremental_equals_full_forward(window, pieces):
    model = tiny(window)
    x = torch.randint(0, 97, (2, sum(pieces)))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 2, x.shape[1])
        outs, i = [], 0
        for p in pieces:
            outs.append(model(x[:, i:i + p], cache=cache))
            i += p
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape[3] == (8 if window else 40)


def test_window_really_matters():
    """Guard for the test above: a model with and without the window must disagree past W tokens."""
    a, b = tiny(8), tiny(None)
    x = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        la, lb = a(x), b(x)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert (la[:, 8:] - lb[:, 8:]).abs().max() > 1e-3


def test_dense_model_cache():
    model = tiny(6, n_experts=0)
    x = torch.randint(0, 97, (1, 25))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 1, 25)
        inc = torch.cat([model(x[:, :4], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(4, 25)], 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_long_generation_keeps_cache_at_window(monkeypatch):
    """4,000 tokens from a windowed model: the cache never grows past W slots, and the last logits still
    equal a full forward pass over the whole sequence."""
    model = tiny(16, layers=1, vocab=50)
    made = []
    real = KVCache.for_model.__func__

    def spy(cls, m, batch, max_len):
        made.append(real(cls, m, batch, max_len))
        return made[-1]

    monkeypatch.setattr(KVCache, "for_model", classmethod(spy))
    prompt = torch.randint(0, 50, (1, 10))
    out = generate(model, prompt, 4000, temperature=1.0, seed=0)
    assert out.shape == (1, 4010)
    cache = made[0]
    assert tuple(cache.k.shape) == (1, 1, 2, 16, 8) and tuple(cache.v.shape) == (1, 1, 2, 16, 8)
    assert tuple(cache.pos.shape) == (1, 16) and cache.t == 4009
    with torch.no_grad():
        full = model(out[:, :-1])[:, -1]
        c2 = KVCache.for_model(model, 1, 4009)
        for i in range(0, 4009, 16):
            last = model(out[:, i:min(i + 16, 4009)], cache=c2)[:, -1]
    torch.testing.assert_close(last, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [6, None])
def test_ragged_batch_equals_single_rows(window):
    model = tiny(window)
    prompts = [[1, 5, 9], [1, 7, 3, 2, 8, 11, 4, 9, 13, 21], [1, 4]]
    batch = generate(model, prompts, 20)
    for p, row in zip(prompts, batch):
        alone = generate(model, [p], 20)[0]
        assert row == alone


def test_chunked_prefill_equals_one_chunk():
    model = tiny(None)
    prompt = torch.randint(0, 97, (2, 30))
    a = generate(model, prompt, 10, prefill_chunk=4)
    b = generate(model, prompt, 10, prefill_chunk=64)
    assert torch.equal(a, b)


def test_greedy_equals_no_cache_argmax():
    model = tiny(8)
    ids = torch.randint(0, 97, (1, 6))
    out = generate(model, ids, 20)
    seq = ids
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("window,n_experts", [(8, 4), (None, 4), (5, 0)])
def test_greedy_equals_transformers_generate(tmp_path, window, n_experts):
    from transformers import AutoModelForCausalLM

    model = tiny(window, n_experts=n_experts)
    save_model(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(3, 97, (1, 7))
    ours = generate(model, ids, 30)
    theirs = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_eos_stops_rows():
    model = tiny(8)
    first = generate(model, [[1, 2, 3]], 1)[0][-1]  # the greedy first token: call it EOS
    out = generate(model, [[1, 2, 3], [1, 2, 3, 4, 5]], 10, eos_id=first)
    assert out[0] == [1, 2, 3, first]
    assert len(out[1]) <= 15


def test_sample_rules():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert sample(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {1}  # token 1 alone has more than half the mass
    a = [sample(logits, 1.0, generator=torch.Generator().manual_seed(7)).item() for _ in range(5)]
    b = [sample(logits, 1.0, generator=torch.Generator().manual_seed(7)).item() for _ in range(5)]
    assert a == b


def test_seeded_sampling_reproducible():
    model = tiny(8)
    a = generate(model, [[1, 2, 3]], 15, temperature=1.0, seed=3)
    b = generate(model, [[1, 2, 3]], 15, temperature=1.0, seed=3)
    c = generate(model, [[1, 2, 3]], 15, temperature=1.0, seed=4)
    assert a == b and a != c


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    model = tiny(8)
    plain = generate(model, [[1, 2, 3]], 30)[0]
    penal = generate(model, [[1, 2, 3]], 30, repetition_penalty=5.0)[0]
    assert len(set(penal[3:])) >= len(set(plain[3:]))


def test_bad_input():
    model = tiny(None)
    with pytest.raises(TinyMixtralError, match="top_p"):
        list(stream(model, [[1, 2]], 3, temperature=1.0, top_p=1.5))
    with pytest.raises(TinyMixtralError, match="temperature"):
        list(stream(model, [[1, 2]], 3, temperature=-1))
    with pytest.raises(TinyMixtralError, match="at least one token"):
        list(stream(model, [[]], 3))
    with pytest.raises(TinyMixtralError, match="exceeds"):
        list(stream(model, [[1] * 500], 20))  # max_seq_len 512 without a window


def test_chat_template():
    assert gen_mod.chat_template("Hi", None) == "[INST] Hi [/INST]"
    assert gen_mod.chat_template("Hi", "Be brief.") == "[INST] Be brief.\n\nHi [/INST]"


def test_package_exports_the_functions():
    """`tinymixtral.generate` is the function even after the CLI imported the module that holds it."""
    import tinymixtral
    import tinymixtral.cli  # noqa: F401
    import tinymixtral.generation  # noqa: F401

    assert tinymixtral.generate is generate and tinymixtral.stream is stream
    model = tiny(8)
    assert tinymixtral.generate(model, torch.tensor([[1, 2]]), 3).shape == (1, 5)


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tinymixtral.tokenizer import train_bpe

    tok = train_bpe([f"the cat sat on mat number {i}. the dog ran." for i in range(200)], 300)
    model = tiny(8, vocab=tok.vocab_size)
    out = tmp_path_factory.mktemp("gen") / "model"
    save_model(model, out, tokenizer=tok)
    return out


def run_cli(*argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tinymixtral", "generate", *argv], capture_output=True, text=True,
                          timeout=120)


def test_cli_prompt_file_batch_num_samples_and_stop(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nthe dog ran\n")
    r = run_cli("--model", str(model_dir), "--prompt-file", str(prompts), "--num-samples", "2",
                "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "1")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("--- ")]
    assert len(rows) == 4  # 2 prompts (the blank line is skipped) x 2 samples
    assert rows[0].startswith("--- 0: the cat") and rows[3].startswith("--- 3: the dog ran")
    assert "batch 4" in r.stderr and "tok/s" in r.stderr
    # --stop cuts each row at the first stop string (greedy, so the text is known in advance)
    full = run_cli("--model", str(model_dir), "--prompt", "the cat", "--max-new-tokens", "20", "--temperature", "0")
    new_text = full.stdout.rstrip("\n")[len("the cat"):]
    stop = new_text.strip()[:2]
    assert stop, "the greedy continuation is empty: the test needs some text"
    cut = run_cli("--model", str(model_dir), "--prompt", "the cat", "--max-new-tokens", "20", "--temperature", "0",
                  "--stop", stop)
    assert cut.returncode == 0 and stop not in cut.stdout[len("the cat"):]
    assert cut.stdout.rstrip("\n") == "the cat" + new_text[:new_text.index(stop)]


def test_cli_chat_and_bad_prompt_file(model_dir, tmp_path):
    r = run_cli("--model", str(model_dir), "--prompt", "hi", "--chat", "--system", "be kind", "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout.startswith("[INST] be kind\n\nhi [/INST]")
    r = run_cli("--model", str(model_dir), "--prompt-file", str(tmp_path / "none.txt"))
    assert r.returncode == 2 and "prompt file not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty.txt").write_text("\n \n")
    r = run_cli("--model", str(model_dir), "--prompt-file", str(tmp_path / "empty.txt"))
    assert r.returncode == 2 and "holds no prompts" in r.stderr
