"""`tinymixtral chat` driven through stdin: replies equal greedy generation over the whole conversation (the
cache is reused exactly across turns), /reset starts over, a full context is a message, not an exit."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from conftest import GEN, mistral_tokenizer_file, tiny_model
from tinymixtral import generate, save_model
from tinymixtral.instruct import chat_template, turn_ids
from tinymixtral.tokenizer import load_tokenizer, train_bpe


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    tok = train_bpe([f"the cat sat on mat number {i}. the dog ran to the park." for i in range(200)], 300)
    root = tmp_path_factory.mktemp("chat")
    # an untrained model writes random bytes; a zero head row (logit 0, below the best of ~300 random logits)
    # keeps it to printable ASCII, so stdout splits into one line per reply
    unprintable = [t for t in range(tok.vocab_size)
                   if t != tok.eos_id and not (tok.decode([t]).isascii() and tok.decode([t]).isprintable())]
    for name, window in (("windowed", 8), ("full", None)):
        model = tiny_model(GEN, sliding_window=window, vocab_size=tok.vocab_size, max_seq_len=512, vary_norms=True)
        with torch.no_grad():
            model.lm_head.weight[unprintable] = 0.0
        save_model(model, root / name, tokenizer=tok)
    return root


def chat(model_dir, lines, *flags):
    return subprocess.run([sys.executable, "-m", "tinymixtral", "chat", "--model", str(model_dir), "--temperature",
                           "0", "--max-new-tokens", "12", *flags], input="".join(f"{x}\n" for x in lines),
                          capture_output=True, text=True, timeout=120)


def greedy(model, tok, ids, n=12):
    """The reply generate() gives to a whole conversation's ids, recomputed from scratch (no cache reuse)."""
    new = generate(model, torch.tensor([ids]), n, temperature=0.0, eos_id=tok.eos_id)[0, len(ids):].tolist()
    return new[:new.index(tok.eos_id) + 1] if tok.eos_id in new else new


@pytest.mark.parametrize("name", ["windowed", "full"])
def test_two_turns_and_reset_equal_greedy_generation(chat_dirs, name):
    from tinymixtral import load_model

    d = chat_dirs / name
    model, tok = load_model(d), load_tokenizer(d)
    r = chat(d, ["the cat sat", "and the dog?", "/reset", "the cat sat", "/exit"], "--system", "be brief")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 3, r.stdout

    turn1 = tok.encode(chat_template("the cat sat", "be brief"), bos=True)
    reply1 = greedy(model, tok, turn1)
    assert replies[0] == tok.decode([t for t in reply1 if t != tok.eos_id])
    closed = reply1 if reply1[-1] == tok.eos_id else reply1 + [tok.eos_id]  # a turn ends with </s>
    turn2 = turn1 + closed + tok.encode(chat_template("and the dog?", None), bos=False)
    reply2 = greedy(model, tok, turn2)
    assert replies[1] == tok.decode([t for t in reply2 if t != tok.eos_id])
    assert replies[2] == replies[0]  # after /reset the same first message gets the same reply
    assert "[new conversation]" in r.stderr


def test_full_context_is_a_message_and_the_chat_goes_on(chat_dirs):
    long = " ".join(["the cat sat on the mat"] * 20)
    r = chat(chat_dirs / "full", [long, "/reset", "the cat sat"], "--context", "48")
    assert r.returncode == 0, r.stderr
    assert "the context is full" in r.stderr and "/reset to start over" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stdout.splitlines()) == 1  # the short message after /reset got its reply


def test_windowed_model_rolls_over_a_long_conversation(chat_dirs):
    r = chat(chat_dirs / "windowed", ["the cat sat on the mat"] * 6, "--context", "16")
    assert r.returncode == 0 and "full" not in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 6


@pytest.fixture(scope="module")
def native_v3(tmp_path_factory):
    """A Mistral-native directory (params.json + consolidated.safetensors) with Mistral-7B-Instruct-v0.3's
    tokenizer.model.v3 (32768 tokens, [INST] = 3 and [/INST] = 4 control tokens)."""
    root = tmp_path_factory.mktemp("native")
    shutil.copy(mistral_tokenizer_file("v3"), root / "tokenizer.model.v3")
    tok = load_tokenizer(root)
    model = tiny_model(GEN, vocab_size=tok.vocab_size, sliding_window=None, vary_norms=True)
    # as in chat_dirs: replies of printable text only, one line each (control tokens decode to "")
    unprintable = [t for t in range(tok.vocab_size) if t != tok.eos_id and not tok.decode([t]).isprintable()]
    with torch.no_grad():
        model.lm_head.weight[unprintable] = 0.0
    d = root / "m"
    save_model(model, d, format="mistral")
    shutil.copy(root / "tokenizer.model.v3", d)
    return d, model, tok


def test_chat_on_a_native_v3_directory(native_v3):
    """Turns carry [INST] / [/INST] as control ids and, in v3, the system prompt in front of each message (the
    last one of the conversation when it is sent); replies equal greedy generation over those ids."""
    d, model, tok = native_v3
    r = chat(d, ["the cat sat", "and the dog?"], "--system", "be brief")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 2, r.stdout
    turn1 = turn_ids(tok, "the cat sat", "be brief", bos=True)
    assert turn1[:2] == [1, 3] and turn1[-1] == 4 and 3 not in tok.encode(chat_template("the cat sat", "be brief"))
    reply1 = greedy(model, tok, turn1)
    assert replies[0] == tok.decode([t for t in reply1 if t != tok.eos_id])
    closed = reply1 if reply1[-1] == tok.eos_id else reply1 + [tok.eos_id]
    turn2 = turn1 + closed + turn_ids(tok, "and the dog?", "be brief")
    assert replies[1] == tok.decode([t for t in greedy(model, tok, turn2) if t != tok.eos_id])


def test_generate_chat_on_a_native_v3_directory(native_v3):
    d, model, tok = native_v3
    r = subprocess.run([sys.executable, "-m", "tinymixtral", "generate", "--model", str(d), "--chat", "--prompt",
                        "the cat sat", "--system", "be brief", "--temperature", "0", "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ids = turn_ids(tok, "the cat sat", "be brief", bos=True)
    new = greedy(model, tok, ids, 6)
    assert r.stdout == "[INST]be brief\n\nthe cat sat[/INST]" + tok.decode(ids + new)[len(tok.decode(ids)):] + "\n"
