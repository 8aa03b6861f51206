"""Generation: ragged batches equal single rows, chunked prefill, greedy text equals the no-cache argmax and
transformers' generate, sampling rules, and `tinymixtral generate`."""

import random

import pytest
import torch

import tinymixtral.generation as gen_mod
from conftest import GEN, assert_one_line_error, call_cli, run_cli, tiny_cfg, tiny_model
from tinymixtral import TinyMixtralError, instruct, save_model
from tinymixtral.generation import apply_repetition_penalty, generate, sample, stream

@pytest.mark.parametrize("window", [6, None])
def test_ragged_batch_equals_single_rows(window):
    model = tiny_model(GEN, sliding_window=window, vary_norms=True)
    prompts = [[1, 5, 9], [1, 7, 3, 2, 8, 11, 4, 9, 13, 21], [1, 4]]
    batch = generate(model, prompts, 20)
    for p, row in zip(prompts, batch):
        alone = generate(model, [p], 20)[0]
        assert row == alone


def test_chunked_prefill_equals_one_chunk():
    model = tiny_model(GEN, sliding_window=None, vary_norms=True)
    prompt = torch.randint(0, 97, (2, 30))
    a = generate(model, prompt, 10, prefill_chunk=4)
    b = generate(model, prompt, 10, prefill_chunk=64)
    assert torch.equal(a, b)


def test_greedy_equals_no_cache_argmax():
    model = tiny_model(GEN, sliding_window=8, vary_norms=True)
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

    model = tiny_model(GEN, sliding_window=window, n_experts=n_experts, vary_norms=True)
    save_model(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(3, 97, (1, 7))
    ours = generate(model, ids, 30)
    theirs = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_eos_stops_rows():
    model = tiny_model(GEN, sliding_window=8, vary_norms=True)
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
    model = tiny_model(GEN, sliding_window=8, vary_norms=True)
    a = generate(model, [[1, 2, 3]], 15, temperature=1.0, seed=3)
    b = generate(model, [[1, 2, 3]], 15, temperature=1.0, seed=3)
    c = generate(model, [[1, 2, 3]], 15, temperature=1.0, seed=4)
    assert a == b and a != c


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    model = tiny_model(GEN, sliding_window=8, vary_norms=True)
    plain = generate(model, [[1, 2, 3]], 30)[0]
    penal = generate(model, [[1, 2, 3]], 30, repetition_penalty=5.0)[0]
    assert len(set(penal[3:])) >= len(set(plain[3:]))


def test_bad_input():
    model = tiny_model(GEN, sliding_window=None, vary_norms=True)
    with pytest.raises(TinyMixtralError, match="top_p"):
        list(stream(model, [[1, 2]], 3, temperature=1.0, top_p=1.5))
    with pytest.raises(TinyMixtralError, match="temperature"):
        list(stream(model, [[1, 2]], 3, temperature=-1))
    for bad in (float("nan"), float("inf")):  # NaN passed `temperature < 0` (issue 16)
        with pytest.raises(TinyMixtralError, match="temperature must be >= 0 .0 = greedy. and finite"):
            list(stream(model, [[1, 2]], 3, temperature=bad))
        with pytest.raises(TinyMixtralError, match="repetition_penalty must be > 0 and finite"):
            list(stream(model, [[1, 2]], 3, repetition_penalty=bad))
    with pytest.raises(TinyMixtralError, match="at least one token"):
        list(stream(model, [[]], 3))
    with pytest.raises(TinyMixtralError, match="exceeds"):
        list(stream(model, [[1] * 500], 20))  # max_seq_len 512 without a window


def test_chat_template():
    assert instruct.chat_template("Hi", None) == "[INST] Hi [/INST]"
    assert instruct.chat_template("Hi", "Be brief.") == "[INST] Be brief.\n\nHi [/INST]"
    assert instruct.chat_template("Hi", "Be brief.", "v3") == "[INST]Be brief.\n\nHi[/INST]"
    assert instruct.chat_template("Hi", "Be brief.", "v7") == "[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]"
    assert instruct.chat_template("Hi", None, "v7") == "[INST]Hi[/INST]"


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tinymixtral.tokenizer import train_bpe

    tok = train_bpe([f"the cat sat on mat number {i}. the dog ran." for i in range(200)], 300)
    model = tiny_model(GEN, sliding_window=8, vocab_size=tok.vocab_size, vary_norms=True)
    out = tmp_path_factory.mktemp("gen") / "model"
    save_model(model, out, tokenizer=tok)
    return out


@pytest.mark.slow
def test_cli_prompt_file_batch_num_samples_and_stop(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nthe dog ran\n")
    r = run_cli("generate", "--model", str(model_dir), "--prompt-file", str(prompts), "--num-samples", "2",
                "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "1")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("--- ")]
    assert len(rows) == 4  # 2 prompts (the blank line is skipped) x 2 samples
    assert rows[0].startswith("--- 0: the cat") and rows[3].startswith("--- 3: the dog ran")
    assert "batch 4" in r.stderr and "tok/s" in r.stderr
    # --stop cuts each row at the first stop string (greedy, so the text is known in advance)
    full = run_cli("generate", "--model", str(model_dir), "--prompt", "the cat", "--max-new-tokens", "20",
                   "--temperature", "0")
    new_text = full.stdout.rstrip("\n")[len("the cat"):]
    stop = new_text.strip()[:2]
    assert stop, "the greedy continuation is empty: the test needs some text"
    cut = run_cli("generate", "--model", str(model_dir), "--prompt", "the cat", "--max-new-tokens", "20",
                  "--temperature", "0", "--stop", stop)
    assert cut.returncode == 0 and stop not in cut.stdout[len("the cat"):]
    assert cut.stdout.rstrip("\n") == "the cat" + new_text[:new_text.index(stop)]


@pytest.mark.slow
def test_cli_chat_and_bad_prompt_file(model_dir, tmp_path):
    r = run_cli("generate", "--model", str(model_dir), "--prompt", "hi", "--chat", "--system", "be kind",
                "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout.startswith("[INST] be kind\n\nhi [/INST]")
    r = run_cli("generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "none.txt"))
    assert "prompt file not found" in assert_one_line_error(r, "generate", 2)
    (tmp_path / "empty.txt").write_text("\n \n")
    r = run_cli("generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "empty.txt"))
    assert "holds no prompts" in assert_one_line_error(r, "generate", 2)


# ---- the command line on a trained model ---------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tinymixtral.data import prepare
    from tinymixtral.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cli-run")
    rng = random.Random(0)
    names, things = ["Tom", "Lily", "Ben", "Mia"], ["the red ball", "a big tree", "the small dog", "the park"]
    docs = [" ".join(f"{rng.choice(names)} ran to {rng.choice(things)}." for _ in range(rng.randint(2, 4)))
            for _ in range(800)]
    (root / "c.txt").write_text("\n<|endoftext|>\n".join(docs))
    prepare(str(root / "c.txt"), root / "data", "bpe:300", val_fraction=0.05)
    mcfg = tiny_cfg(vocab_size=320)
    tcfg = TrainConfig(data=str(root / "data"), out=str(root / "run"), batch_size=8, seq_len=32, lr=1e-2,
                       warmup_steps=3, max_steps=30, eval_interval=100, eval_batches=2, log_interval=10,
                       progress=False)
    train(tcfg, mcfg)
    return root / "run"


@pytest.mark.parametrize("compile_flag", [[], pytest.param(["--compile"], marks=pytest.mark.slow)])
def test_generate_from_a_trained_model(run_dir, compile_flag):
    prompt = "Tom ran to"
    r = run_cli("generate", "--model", str(run_dir / "latest"), "--prompt", prompt, "--max-new-tokens", "5",
                "--temperature", "0", *compile_flag)
    assert r.returncode == 0, r.stderr
    text = r.stdout.rstrip("\n")
    assert text.startswith(prompt) and len(text) > len(prompt) and "\n" not in text
    assert "tokens in" in r.stderr and "Traceback" not in r.stderr
    # greedy decoding is the model's argmax continuation
    from tinymixtral import load_model
    from tinymixtral.tokenizer import load_tokenizer

    model, tok = load_model(run_dir / "latest"), load_tokenizer(run_dir / "latest")
    ids = torch.tensor([tok.encode(prompt, bos=True)])
    new = generate(model, ids, 5, temperature=0.0, eos_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert text == tok.decode(ids[0, 1:].tolist() + new)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_compile_flag_defaults_to_auto(command, capsys):
    """--compile is auto unless told: --compile alone (the old switch) is true; --compile false / --no-compile
    decode eagerly; anything else is argparse's one error line."""
    from tinymixtral import cli

    parser = cli.build_parser(command)
    flags = {(): "auto", ("--compile",): True, ("--compile", "true"): True, ("--compile=auto",): "auto",
             ("--compile", "false"): False, ("--no-compile",): False}
    for extra, want in flags.items():
        assert parser.parse_args([command, "--model", "m", *extra]).compile == want, extra
    with pytest.raises(SystemExit) as e:
        parser.parse_args([command, "--model", "m", "--compile", "maybe"])
    assert e.value.code == 2 and "expected auto, true or false, got 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--bits", "8"], ["--bits", "4", "--group-size", "32"], ["--dtype", "bf16"]])
def test_generate_loads_quantized_or_cast(run_dir, flags):
    """generate --bits / --dtype: the greedy continuation of the model loaded that way."""
    from tinymixtral import load_model
    from tinymixtral.tokenizer import load_tokenizer

    prompt = "Tom ran to"
    r = run_cli("generate", "--model", str(run_dir / "latest"), "--prompt", prompt, "--max-new-tokens", "5",
                "--temperature", "0", *flags)
    assert r.returncode == 0, r.stderr
    kw = {"bits": int(flags[1])} if flags[0] == "--bits" else {"dtype": torch.bfloat16}
    model, tok = load_model(run_dir / "latest", **kw), load_tokenizer(run_dir / "latest")
    assert (model.cfg.quantization or {}).get("bits") == kw.get("bits")
    ids = torch.tensor([tok.encode(prompt, bos=True)])
    new = generate(model, ids, 5, temperature=0.0, eos_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert r.stdout.rstrip("\n") == tok.decode(ids[0, 1:].tolist() + new)


@pytest.mark.parametrize("argv,message", [
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-k", "0"], "top_k must be >= 1"),
    (["--prompt", ""], "the prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_bad_flags_exit_2(run_dir, capsys, argv, message):
    r = call_cli(capsys, "generate", "--model", run_dir / "latest", *argv)
    assert message in assert_one_line_error(r, "generate", 2) and r.stdout == ""


def test_generate_bad_flags_subprocess(run_dir):
    r = run_cli("generate", "--model", run_dir / "latest", "--top-p", "1.5")
    assert r.returncode == 2 and r.stdout == ""
    assert_one_line_error(r, "generate", 2)


def test_generate_missing_model_exit_2(tmp_path, capsys):
    r = call_cli(capsys, "generate", "--model", tmp_path / "none", "--max-new-tokens", "1")
    assert "model directory not found" in assert_one_line_error(r, "generate", 2)
