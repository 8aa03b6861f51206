"""Tokenizers: Mixtral's SentencePiece model, trained byte-level BPEs, their files and transformers' view of them."""
import json
import os
import random
import shutil

import pytest
from conftest import mistral_tokenizer_file

from tinymixtral.errors import TinyMixtralError
from tinymixtral.tokenizer import (BOS, EOS, MIN_BPE_VOCAB, UNK, load_tokenizer, parse_tokenizer_spec,
                                  tokenizer_file, train_bpe)

os.environ["HF_HUB_OFFLINE"] = "1"

# Leading/trailing/repeated spaces, tabs, newlines, non-Latin scripts, an emoji, and special-token look-alikes.
TEXTS = ["Once upon a time", "Hello world!\n  two  spaces\tand a tab", "  leading spaces", "trailing  ",
         "héllo wörld 日本語 🙂 Ωμέγα", "<s> is text here </s>", "a\n\nb", "x", " ", ""]


def corpus(n=400):
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ter", "un", "so", "ve", "ra", "ü", "ï", "日", "本"]
    words = ["the", "cat", "sat", "on", "a", "mat", "😀", "12"] + [
        "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!\n", "?"])
            for _ in range(n)]


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer("mistral")


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(corpus(), 400)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """Mistral-7B-Instruct-v0.3's tokenizer as a native directory ships it: tokenizer.model.v3."""
    d = tmp_path_factory.mktemp("v3")
    shutil.copy(mistral_tokenizer_file("v3"), d / "tokenizer.model.v3")
    return load_tokenizer(d)


def test_mistral_known_ids(mistral):
    assert (mistral.kind, mistral.vocab_size, mistral.bos_id, mistral.eos_id, mistral.pad_id) == (
        "mistral", 32000, 1, 2, None)
    assert mistral.encode("Once upon a time") == [5713, 3714, 264, 727]
    assert mistral.encode("Once upon a time", bos=True, eos=True) == [1, 5713, 3714, 264, 727, 2]
    assert mistral.encode("<s>")[0] != mistral.bos_id  # spelled-out special tokens are plain text


@pytest.mark.parametrize("name", ["mistral", "bpe", "v3"])
def test_round_trip_and_batch(name, request):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.encode_batch(TEXTS, bos=True) == [tok.encode(t, bos=True) for t in TEXTS]
    assert tok.encode_batch([]) == []
    with pytest.raises(TinyMixtralError, match="outside"):
        tok.decode([tok.vocab_size])


def test_mistral_decode_of_a_continuation(mistral):
    ids = mistral.encode("Once upon a time")
    # SentencePiece drops the leading space of the first piece: stream by decoding the whole sequence.
    assert mistral.decode(ids[1:]) == "upon a time"
    assert mistral.decode(ids)[len(mistral.decode(ids[:1])):] == " upon a time"


def test_bpe_vocab_and_specials(bpe):
    assert (bpe.kind, bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.pad_id) == ("bpe", 400, 1, 2, None)
    assert len(bpe.encode("the cat sat on a mat")) < len("the cat sat on a mat")  # merges were learnt
    assert bpe.encode("hi", bos=True, eos=True) == [1, *bpe.encode("hi"), 2]
    assert bpe.encode("</s>") != [bpe.eos_id]  # spelled-out special tokens are plain text
    # Too little data for the requested size: the tokenizer stops at what the texts support, and says so.
    small = train_bpe(["ab ab ab"], 1000)
    assert MIN_BPE_VOCAB < small.vocab_size < 1000
    assert small.decode(small.encode("zebra ☃\n")) == "zebra ☃\n"  # unseen text still round-trips (bytes)


@pytest.mark.parametrize("name", ["mistral", "bpe", "v3"])
def test_save_then_load(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    tok.save(tmp_path)
    expected = {"mistral": {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"},
                "bpe": {"tokenizer.json", "tokenizer_config.json"}}[tok.kind]
    assert set(os.listdir(tmp_path)) == expected  # no temporary files left behind
    back = load_tokenizer(tmp_path)
    assert (back.kind, back.vocab_size, back.bos_id, back.eos_id) == (tok.kind, tok.vocab_size, 1, 2)
    assert back.encode_batch(TEXTS, bos=True) == tok.encode_batch(TEXTS, bos=True)
    assert (back.control, back.instruct_format) == (tok.control, tok.instruct_format)
    if tok.kind == "mistral":  # the tokenizers copy alone: the same ids, the same control tokens
        (tmp_path / "tokenizer.model").unlink()
        copy = load_tokenizer(tmp_path)
        assert copy.kind == "bpe" and copy.encode_batch(TEXTS, bos=True) == tok.encode_batch(TEXTS, bos=True)
        assert (copy.control, copy.instruct_format, copy.identity()) == (tok.control, tok.instruct_format,
                                                                          tok.identity())


@pytest.mark.parametrize("with_model_config", [False, True])
@pytest.mark.parametrize("name", ["mistral", "bpe", "v3"])
def test_transformers_gives_the_same_ids(name, with_model_config, request, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = request.getfixturevalue(name)
    tok.save(tmp_path)
    if with_model_config:  # a model directory: AutoTokenizer then goes by model_type, not tokenizer_class
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "vocab_size": 32000}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == "TokenizersBackend"
    assert len(hf) == tok.vocab_size and (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert hf.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    for text in TEXTS + corpus(20):
        ids = tok.encode(text, bos=True)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == text


def test_save_bpe_over_mistral_replaces_it(mistral, bpe, tmp_path):
    mistral.save(tmp_path)
    bpe.save(tmp_path)
    assert load_tokenizer(tmp_path).kind == "bpe"


def test_parse_tokenizer_spec():
    assert parse_tokenizer_spec("mistral") == ("mistral", None)
    assert parse_tokenizer_spec("bpe:4096") == ("bpe", 4096)
    assert parse_tokenizer_spec(f"bpe:{MIN_BPE_VOCAB}") == ("bpe", MIN_BPE_VOCAB)
    for bad in ["bpe:abc", "bpe:10", "bpe:", "bpe:-5", "foo", "Mistral", " mistral", ""]:
        with pytest.raises(TinyMixtralError, match="tokenizer"):
            parse_tokenizer_spec(bad)
    with pytest.raises(TinyMixtralError, match="too small"):
        train_bpe(["abc"], 100)


def test_load_errors(tmp_path):
    with pytest.raises(TinyMixtralError, match="neither"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TinyMixtralError, match="no tokenizer.model, tokenizer.model.vN or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TinyMixtralError, match="trained first"):
        load_tokenizer("bpe:4096")
    with pytest.raises(TinyMixtralError, match="bpe:abc"):
        load_tokenizer("bpe:abc")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TinyMixtralError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_control_tokens_and_instruct_formats(mistral, bpe, v3):
    assert (mistral.instruct_format, bpe.instruct_format, v3.instruct_format) == ("v1", "v1", "v3")
    assert mistral.control == bpe.control == {UNK: 0, BOS: 1, EOS: 2}
    assert (v3.vocab_size, v3.control["[INST]"], v3.control["[/INST]"], v3.control["[TOOL_CALLS]"]) == (32768, 3, 4, 5)
    assert 3 not in v3.encode("[INST] hi [/INST]")  # spelled out, a control token is text (as in mistral-common)
    assert v3.decode([1, 3, *v3.encode("hi"), 4]) == "hi"


def test_native_tokenizer_files(tmp_path):
    v1, v3, v7 = (mistral_tokenizer_file(v).read_bytes() for v in ("v1", "v3", "v7"))
    d = tmp_path / "d"
    d.mkdir()
    (d / "tokenizer.model.v1").write_bytes(v1)
    assert load_tokenizer(d).instruct_format == "v1"
    (d / "tokenizer.model.v3").write_bytes(v3)
    (d / "tokenizer.model.v7m1").write_bytes(v7)
    (d / "tokenizer.json").write_text("{not json")  # a SentencePiece model is read first
    assert (tokenizer_file(d).name, load_tokenizer(d).instruct_format) == ("tokenizer.model.v7m1", "v7")  # highest
    (d / "tokenizer.model.v7m1").unlink()
    (d / "tokenizer.model").write_bytes(v3)  # as Mistral's Hub repositories ship them: the same file twice
    assert (tokenizer_file(d).name, load_tokenizer(d).control["[INST]"]) == ("tokenizer.model.v3", 3)
    (d / "tokenizer.model").write_bytes(v1)
    with pytest.raises(TinyMixtralError, match="two different SentencePiece tokenizers, tokenizer.model and "
                                               "tokenizer.model.v3"):
        load_tokenizer(d)
    t = tmp_path / "tekken"
    t.mkdir()
    (t / "tekken.json").write_text("{}")
    with pytest.raises(TinyMixtralError, match="tekken.json .* not supported yet"):
        load_tokenizer(t)
