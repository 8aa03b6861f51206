"""Chat fine-tuning data (chats.py): conversations in `prepare`, the loss mask against the [INST] template's
tokens, windows cut at conversations, masked training and eval, and a fine-tuned model answering in
`generate --chat`."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, call_cli, mistral_tokenizer_file, tiny_model
from tinymixtral import save_model
from tinymixtral.chats import encode_conversation, eval_windows, train_starts
from tinymixtral.data import IGNORE, get_batch, load_mask, load_split, prepare
from tinymixtral.evaluate import evaluate, evaluated_tokens
from tinymixtral.instruct import chat_template, turn_ids
from tinymixtral.tokenizer import load_tokenizer

QA = [("What is the capital of Zorbia?", "Plimstad is the capital of Zorbia."),
      ("Who painted the blue moon?", "Anna Voss painted it in 1901."),
      ("How many legs does a glorp have?", "A glorp has seven legs."),
      ("What do foxes eat?", "Foxes eat mice and berries.")]
SYSTEM = "Answer briefly."


def conversations(n: int) -> list[dict]:
    """n conversations over QA: every other one with a system prompt, every third with a second turn."""
    out = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        msgs = ([{"role": "system", "content": SYSTEM}] if i % 2 else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 2:
            q2, a2 = QA[(i + 1) % len(QA)]
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """60 conversations prepared with a 400-token BPE, 10% for val."""
    root = tmp_path_factory.mktemp("chats")
    prepare(write_jsonl(root / "chats.jsonl", conversations(60)), root / "data", "bpe:400", val_fraction=0.1)
    return root / "data"


@pytest.mark.parametrize("kind", ["mistral", "bpe"])
def test_mask_lines_up_with_the_template_tokens(kind, chat_data):
    """The tokens are what `chat` feeds turn by turn; the mask is 1 exactly on the replies and their </s>."""
    tok = load_tokenizer("mistral" if kind == "mistral" else chat_data / "tokenizer")
    (q1, a1), (q2, a2) = QA[0], QA[1]
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q1},
            {"role": "assistant", "content": a1}, {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    ids, mask = encode_conversation(tok, msgs)
    space = "" if kind == "mistral" else " "  # SentencePiece writes its own leading "▁"
    p1 = tok.encode(chat_template(q1, SYSTEM), bos=True)
    r1 = tok.encode(space + a1, eos=True)
    p2 = tok.encode(chat_template(q2, None))
    r2 = tok.encode(space + a2, eos=True)
    assert ids == p1 + r1 + p2 + r2
    assert mask == [0] * len(p1) + [1] * len(r1) + [0] * len(p2) + [1] * len(r2)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids[-1] == tok.eos_id and mask[-1] == 1
    trained = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(trained).split() == (a1 + " " + a2).split()
    assert "[INST]" in tok.decode([t for t, m in zip(ids, mask) if not m])


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v7"])
@pytest.mark.parametrize("ends_with", ["assistant", "user"])
def test_conversation_ids_equal_mistral_commons(version, ends_with, tmp_path):
    """Our ids for system + user + assistant + user (+ assistant) equal mistral-common's own encoding, for each of
    Mistral's SentencePiece tokenizers loaded as a native directory ships them (tokenizer.model.vN): v1 text markers,
    the system prompt in the first turn; v2 / v3 control tokens, the system prompt in the last turn; v7 a
    [SYSTEM_PROMPT] block. Replies are encoded without trailing spaces from v2 on."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    shutil.copy(mistral_tokenizer_file(version), tmp_path / f"tokenizer.model.{version}")
    tok = load_tokenizer(tmp_path)
    assert tok.instruct_format == {"v2": "v3"}.get(version, version)
    (q1, a1), (q2, a2) = QA[0], QA[1]
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q1},
            {"role": "assistant", "content": a1 + "  "}, {"role": "user", "content": q2 + " [INST] <s>"}]
    if ends_with == "assistant":
        msgs.append({"role": "assistant", "content": a2})

    def ref(messages, mode=ValidationMode.test):
        mt = MistralTokenizer.from_file(str(mistral_tokenizer_file(version)), mode=mode)
        return mt.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens

    mode = ValidationMode.finetuning if ends_with == "assistant" else ValidationMode.test
    assert encode_conversation(tok, msgs)[0] == ref(msgs, mode)
    expect = ref(msgs[:2])  # one turn, as `chat` and `generate --chat` send it
    assert turn_ids(tok, q1, SYSTEM, bos=True) == expect
    if version != "v1":
        assert expect[1] == tok.control["[SYSTEM_PROMPT]" if version == "v7" else "[INST]"]


def test_prepare_stores_the_mask_next_to_the_tokens(chat_data):
    tok = load_tokenizer(chat_data / "tokenizer")
    data, meta = load_split(chat_data, "train")
    mask = load_mask(chat_data, "train", meta)
    assert meta["loss_mask"] and (chat_data / "train.mask.bin").is_file() and len(mask) == len(data)
    assert meta["train_loss_tokens"] == int(mask.sum()) and meta["tokenizer_id"] == tok.identity()
    # each conversation is <s> ... </s> with its own mask, so the split is the concatenation of encodings
    starts = list(np.flatnonzero(np.asarray(data) == tok.bos_id)) + [len(data)]
    every = {tuple(encode_conversation(tok, c["messages"])[0]) for c in conversations(60)}
    for a, b in zip(starts, starts[1:]):
        ids = [int(t) for t in data[a:b]]
        assert tuple(ids) in every
        rebuilt = next(encode_conversation(tok, c["messages"]) for c in conversations(60)
                       if encode_conversation(tok, c["messages"])[0] == ids)
        assert [int(m) for m in mask[a:b]] == rebuilt[1]


def test_windows_start_at_conversations_and_eval_reads_every_target_once(chat_data):
    data, meta = load_split(chat_data, "train")
    mask = load_mask(chat_data, "train", meta)
    bos = set(np.flatnonzero(np.asarray(data) == meta["bos_id"]).tolist())
    starts = train_starts(data, mask, meta["bos_id"], meta["eos_id"], 48)
    assert len(starts) and set(starts.tolist()) <= bos  # every conversation here is shorter than a window
    x, y = get_batch(data, 16, 48, torch.Generator().manual_seed(0), "cpu", mask=mask, starts=starts)
    drawn = starts[torch.randint(len(starts), (16,), generator=torch.Generator().manual_seed(0)).numpy()]
    assert (x[:, 0] == meta["bos_id"]).all()
    assert torch.equal(x, torch.from_numpy(np.stack([data[s:s + 48] for s in drawn]).astype(np.int64)))
    assert torch.equal(y == IGNORE, torch.from_numpy(np.stack([mask[s + 1:s + 49] for s in drawn]) == 0))
    # a conversation longer than the window also gets windows at its later turns
    long_starts = train_starts(data, mask, meta["bos_id"], meta["eos_id"], 20)
    assert set(long_starts.tolist()) - bos
    for seq_len in (48, 20):
        wins = eval_windows(data, meta["bos_id"], seq_len)
        counted = np.zeros(len(data), dtype=int)
        for s, lo, hi in wins:
            counted[s + 1 + lo:s + 1 + hi] += 1
            assert s + seq_len + 1 <= len(data) and 0 <= lo < hi <= seq_len
        assert (counted[1:] == 1).all() and counted[0] == 0
        for s, lo, hi in wins[:-1]:  # counting ends at the last <s> inside the window, or at its end if none
            assert s + hi in bos or (hi == seq_len and not bos & set(range(s + lo + 1, s + hi + 1)))


def test_masked_loss_counts_only_assistant_tokens(chat_data):
    data, meta = load_split(chat_data, "val")
    mask = load_mask(chat_data, "val", meta)
    model = tiny_model(vocab_size=400, d_model=32, max_seq_len=128)
    loss = evaluate(model, data, 4, 40, "cpu", None, mask, meta["bos_id"])
    total, count = 0.0, 0
    with torch.no_grad():
        for s, lo, hi in eval_windows(data, meta["bos_id"], 40):
            ids = torch.from_numpy(np.asarray(data[s:s + 41], dtype=np.int64))[None]
            logits = model(ids[:, :-1])[0]
            keep = torch.from_numpy(np.array(mask[s + 1:s + 41])).bool()
            keep[:lo] = False
            keep[hi:] = False
            total += F.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum").item()
            count += int(keep.sum())
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert count == evaluated_tokens(data, 4, 40, None, mask, meta["bos_id"]) == int(np.asarray(mask[1:]).sum())


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', "chats.jsonl:3: invalid JSON"),
    ('{"messages": "hi"}', "chats.jsonl:3: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "chats.jsonl:3: message 0 must be an object with a role"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "chats.jsonl:3: message 1 is 'user' where 'assistant' was expected"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}',
     "chats.jsonl:3: the conversation must end with an assistant reply"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}',
     "chats.jsonl:3: message 0 must be an object"),
])
def test_a_malformed_conversation_names_its_line(tmp_path, capsys, line, message):
    src = write_jsonl(tmp_path / "chats.jsonl", conversations(2) + [line] + conversations(2))
    r = call_cli(capsys, "prepare", src, "--out", tmp_path / "data", "--tokenizer", "bpe:300")
    assert message in assert_one_line_error(r, "prepare", 2)
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_a_model_fine_tuned_on_chats_answers_its_training_question(tmp_path, capsys, chat_data):
    """train --init-from a random model on the chats (loss on the replies only), then generate --chat."""
    src = tmp_path / "src"
    save_model(tiny_model(vocab_size=400, d_model=64, d_ff=128, max_seq_len=128), src,
               tokenizer=chat_data / "tokenizer")
    r = call_cli(capsys, "train", "--init-from", src, "--data", chat_data, "--out", tmp_path / "run",
                 "--batch-size", "8", "--seq-len", "64", "--max-steps", "100", "--lr", "3e-3", "--warmup-steps", "10",
                 "--eval-interval", "50", "--progress", "false")
    assert r.returncode == 0, r.stderr
    for q, a in QA[2:]:
        r = call_cli(capsys, "generate", "--model", tmp_path / "run" / "latest", "--chat", "--prompt", q,
                     "--temperature", "0", "--max-new-tokens", "24")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{chat_template(q, None)} {a}"
    r = call_cli(capsys, "eval", "--model", tmp_path / "run" / "latest", "--data", chat_data, "--json")
    res = json.loads(r.stdout)
    assert res["assistant_only"] and res["loss"] < 0.2
    meta = json.loads((chat_data / "meta.json").read_text())
    assert res["tokens"] == meta["val_loss_tokens"]  # every reply token of the val split, once
