"""`tinymixtral prepare`: every source kind, both tokenizer kinds, the file layout and bad input."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, call_cli, make_docs, run_cli, write_txt
from tinymixtral import data as D
from tinymixtral import prepare as P
from tinymixtral.errors import TinyMixtralError
from tinymixtral.tokenizer import load_tokenizer


def write_jsonl(path: Path, docs: list[str]) -> Path:
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(docs)]
    lines.insert(len(lines) // 2, "")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    return path


def split_segments(arr: np.ndarray, bos: int, eos: int) -> list[np.ndarray]:
    """The documents of a token file; asserts each is exactly BOS ... EOS with no other BOS/EOS inside."""
    arr = np.asarray(arr, dtype=np.int64)
    assert arr.size and arr[0] == bos and arr[-1] == eos
    ends = np.flatnonzero(arr == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    segs = []
    for s, e in zip(starts, ends):
        seg = arr[s:e + 1]
        assert seg[0] == bos and seg[-1] == eos
        assert not np.isin(seg[1:-1], [bos, eos]).any()
        segs.append(seg)
    return segs


def decoded_docs(out: Path, split: str) -> tuple[list[str], dict]:
    """Decode a prepared split back into its documents (and check the file against meta.json)."""
    arr, meta = D.load_split(out, split)
    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == meta["vocab_size"]
    assert arr.dtype == np.dtype(meta["dtype"])
    assert len(arr) == meta[f"{split}_tokens"]
    assert int(arr.max()) < meta["vocab_size"]
    segs = split_segments(arr, meta["bos_id"], meta["eos_id"])
    assert len(segs) == meta[f"{split}_docs"]
    docs = [tok.decode(s) for s in segs]
    assert meta[f"{split}_bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    return docs, meta


def check_prepared(out: Path, docs: list[str], val_fraction: float):
    """train + val hold every document once, in source order, wrapped in BOS/EOS, counts in meta.json."""
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train.bin", "val.bin"]
    train, meta = decoded_docs(out, "train")
    val, _ = decoded_docs(out, "val")
    assert sorted(train + val) == sorted(docs)
    assert len(val) == max(1, round(len(docs) * val_fraction))
    order = {d: i for i, d in enumerate(docs)}
    for part in (train, val):  # each split keeps the source's order
        idx = [order[d] for d in part]
        assert idx == sorted(idx)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300
    assert (meta["bos_id"], meta["eos_id"]) == (1, 2)
    assert json.loads((out / "meta.json").read_text()) == meta
    return train, val, meta


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ---- local sources ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs():
    return make_docs(600)


def test_txt_source(tmp_path, docs):
    src = write_txt(tmp_path / "corpus.txt", docs)
    meta = D.prepare(str(src), tmp_path / "out", "bpe:300", val_fraction=0.1, seed=0)
    assert meta["source"] == str(src) and meta["synthetic"] is False and meta["tokenizer"] == "bpe:300"
    train, val, _ = check_prepared(tmp_path / "out", docs, 0.1)
    assert leftovers(tmp_path) == ["corpus.txt", "out"]  # no temp directory left behind
    # The split is seeded: the same seed gives the same split, another seed another one.
    D.prepare(str(src), tmp_path / "out2", "bpe:300", val_fraction=0.1, seed=0)
    assert decoded_docs(tmp_path / "out2", "val")[0] == val
    D.prepare(str(src), tmp_path / "out3", "bpe:300", val_fraction=0.1, seed=1)
    assert decoded_docs(tmp_path / "out3", "val")[0] != val


def test_txt_single_document_is_split_by_characters(tmp_path):
    text = " ".join(make_docs(200))  # no separator: one document
    meta = D.prepare(str(write_txt(tmp_path / "one.txt", [text])), tmp_path / "out", "bpe:300", val_fraction=0.1)
    train, _ = decoded_docs(tmp_path / "out", "train")
    val, _ = decoded_docs(tmp_path / "out", "val")
    assert meta["train_docs"] == meta["val_docs"] == 1
    assert train[0] + val[0] == text and abs(len(val[0]) - 0.1 * len(text)) <= 1


def test_val_file_is_the_val_split(tmp_path, capsys):
    train_text, val_text = " ".join(make_docs(150)), " ".join(make_docs(20, seed=5))
    src, vf = write_txt(tmp_path / "book.txt", [train_text]), write_txt(tmp_path / "tail.txt", [val_text])
    assert call_cli(capsys, "prepare", src, "--out", tmp_path / "out", "--tokenizer", "bpe:300",
                    "--val-file", vf).returncode == 0
    train, _ = decoded_docs(tmp_path / "out", "train")
    val, _ = decoded_docs(tmp_path / "out", "val")
    assert train == [train_text] and val == [val_text]  # nothing held out of the source
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["val_source"] == str(vf)
    empty = write_txt(tmp_path / "empty.txt", ["  "])
    err = assert_one_line_error(call_cli(capsys, "prepare", src, "--out", tmp_path / "o2", "--val-file", empty),
                                "prepare", 2)
    assert "holds no text" in err and not (tmp_path / "o2").exists()


def test_jsonl_source(tmp_path, docs):
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    D.prepare(str(src), tmp_path / "out", "bpe:300", val_fraction=0.05, seed=3)
    check_prepared(tmp_path / "out", docs, 0.05)


def test_parquet_source(tmp_path, docs):
    src = write_parquet(tmp_path / "docs.parquet", docs)
    D.prepare(str(src), tmp_path / "out", "bpe:300", val_fraction=0.05)
    check_prepared(tmp_path / "out", docs, 0.05)


def test_folder_mixing_file_kinds(tmp_path, docs):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_txt(folder / "a.txt", docs[:200])
    write_jsonl(folder / "b.jsonl", docs[200:400])
    write_parquet(folder / "sub" / "c.parquet", docs[400:])
    (folder / "notes.md").write_text("# not a source file\n")
    (folder / "weights.bin").write_bytes(b"\x00\xff" * 10)
    meta = D.prepare(str(folder), tmp_path / "out", "bpe:300", val_fraction=0.1)
    check_prepared(tmp_path / "out", docs, 0.1)
    assert meta["train_docs"] + meta["val_docs"] == len(docs)


def test_max_docs_and_replacing_an_existing_output(tmp_path, docs):
    src = write_txt(tmp_path / "c.txt", docs)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    (out / "meta.json").write_text("{}")  # an earlier prepared output (a directory without one is refused)
    meta = D.prepare(str(src), out, "bpe:300", val_fraction=0.1, max_docs=100)
    assert meta["train_docs"] + meta["val_docs"] == 100
    check_prepared(out, docs[:100], 0.1)  # the stale file is gone: the output was replaced whole


def test_failed_prepare_keeps_the_previous_output_and_leaves_no_temp(tmp_path, docs, monkeypatch):
    src = write_txt(tmp_path / "c.txt", docs[:100])
    out = tmp_path / "out"
    D.prepare(str(src), out, "bpe:300", val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = P.write_tokens

    def failing(texts, tok, path, dtype, desc, batch=2048, **kw):
        if path.name == "val.bin":  # train.bin is already written in the temp directory
            raise TinyMixtralError("simulated failure while tokenizing")
        return real(texts, tok, path, dtype, desc, batch, **kw)

    monkeypatch.setattr(P, "write_tokens", failing)  # prepare.py's, which prepare calls
    with pytest.raises(TinyMixtralError, match="simulated"):
        D.prepare(str(write_txt(tmp_path / "d.txt", docs)), out, "bpe:300", val_fraction=0.1)
    assert leftovers(tmp_path) == ["c.txt", "d.txt", "out"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ---- Hugging Face datasets --------------------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache inside the test's temporary directory."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def test_local_hf_dataset_dir_uses_its_validation_split(tmp_path, docs, hf_cache):
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    train_docs, val_docs = docs[:500], docs[500:]
    for name, part in (("train", train_docs), ("validation", val_docs)):
        (ds_dir / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    assert P._is_hf_dataset_dir(ds_dir)
    meta = D.prepare(str(ds_dir), tmp_path / "out", "bpe:300", val_fraction=0.5)
    assert meta["source"] == str(ds_dir) and meta["synthetic"] is False
    train, _ = decoded_docs(tmp_path / "out", "train")
    val, _ = decoded_docs(tmp_path / "out", "val")
    assert val == val_docs  # its own validation split, not a val_fraction share of train
    assert train == train_docs
    assert (meta["train_docs"], meta["val_docs"]) == (500, len(val_docs))
    assert "my_dataset" in leftovers(tmp_path) and not [n for n in leftovers(tmp_path) if "tmp" in n]


@pytest.mark.parametrize("val_name", ["validation.txt", "val.txt", "test.txt"])
def test_txt_folder_with_split_files_keeps_its_splits(tmp_path, docs, capsys, val_name):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_txt(folder / "train-00000-of-00002.txt", docs[:250])  # shards of one split, as datasets names them
    write_txt(folder / "train-00001-of-00002.txt", docs[250:500])
    write_txt(folder / val_name, docs[500:])
    meta = D.prepare(str(folder), tmp_path / "out", "bpe:300", val_fraction=0.5)
    assert decoded_docs(tmp_path / "out", "train")[0] == docs[:500]
    assert decoded_docs(tmp_path / "out", "val")[0] == docs[500:]  # its own val file, not a val_fraction share
    assert (meta["train_docs"], meta["val_docs"]) == (500, len(docs) - 500)
    # a text file that is neither split: one line, nothing written
    write_txt(folder / "notes.txt", ["where does this go?"])
    capsys.readouterr()
    err = assert_one_line_error(call_cli(capsys, "prepare", folder, "--out", tmp_path / "o2", "--tokenizer",
                                         "bpe:300"), "prepare", 2)
    assert "notes.txt" in err and not (tmp_path / "o2").exists()


def test_tinystories_source_goes_through_datasets_load_dataset(tmp_path, docs, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:400]}),
                                     "validation": datasets.Dataset.from_dict({"text": docs[400:450]})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    meta = D.prepare("tinystories", tmp_path / "out", "bpe:300")
    assert calls == ["roneneldan/TinyStories"]
    assert meta["source"] == "tinystories" and meta["synthetic"] is True and "TinyStories" in meta["description"]
    assert decoded_docs(tmp_path / "out", "val")[0] == docs[400:450]
    assert decoded_docs(tmp_path / "out", "train")[0] == docs[:400]


def test_hf_dataset_load_failure_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(name, *args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TinyMixtralError, match="cannot load dataset 'roneneldan/TinyStories'") as e:
        D.prepare("tinystories", tmp_path / "out", "bpe:300")
    assert "\n" not in str(e.value)
    assert leftovers(tmp_path) == []


# ---- tokenizers and the offline stories ---------------------------------------------------------------
def test_bpe_vocab_is_at_most_the_requested_size(tmp_path, docs):
    src = write_txt(tmp_path / "c.txt", docs[:200])
    meta = D.prepare(str(src), tmp_path / "out", "bpe:280", val_fraction=0.1)
    assert meta["tokenizer"] == "bpe:280" and 259 <= meta["vocab_size"] <= 280
    assert load_tokenizer(tmp_path / "out" / "tokenizer").vocab_size == meta["vocab_size"]


def test_mistral_tokenizer(tmp_path, docs):
    src = write_txt(tmp_path / "c.txt", docs[:150])
    meta = D.prepare(str(src), tmp_path / "out", "mistral", val_fraction=0.1)
    assert meta["vocab_size"] == 32000 and meta["dtype"] == "uint16"  # 32000 < 65536
    arr, _ = D.load_split(tmp_path / "out", "train")
    assert arr.dtype == np.uint16
    tok = load_tokenizer("mistral")
    once = [tok.bos_id] + tok.encode("Once upon a time")
    assert once[1:] == [5713, 3714, 264, 727]
    windows = np.lib.stride_tricks.sliding_window_view(arr.astype(np.int64), len(once))
    hits = np.flatnonzero((windows == np.array(once)).all(axis=1))
    starts = sum(1 for d in decoded_docs(tmp_path / "out", "train")[0] if d.startswith("Once upon a time"))
    assert len(hits) == starts > 0  # every story that starts so, right after its BOS
    saved = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert saved.vocab_size == 32000 and saved.encode("Once upon a time") == once[1:]


def test_stories_source(tmp_path):
    pytest.importorskip("tinymixtral.stories", reason="the offline story module has not landed yet")
    meta = D.prepare("stories", tmp_path / "out", "bpe:300", num_stories=300, seed=5)
    assert meta["source"] == "stories" and meta["synthetic"] is True
    assert isinstance(meta["description"], str) and meta["description"].strip()
    assert meta["train_docs"] + meta["val_docs"] == 300
    from tinymixtral.stories import generate_stories

    train, _ = decoded_docs(tmp_path / "out", "train")
    val, _ = decoded_docs(tmp_path / "out", "val")
    assert sorted(train + val) == sorted(t.strip() for t in generate_stories(300, seed=5))


# ---- bad input --------------------------------------------------------------------------------------
def _bad_cases(tmp: Path):
    (tmp / "empty.txt").write_text("  \n\n ")
    (tmp / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (tmp / "nonstr.jsonl").write_text('{"text": 5}\n')
    (tmp / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    (tmp / "nofiles").mkdir()
    (tmp / "nofiles" / "readme.md").write_text("no text files here")
    (tmp / "good.txt").write_text("Tom ran to the park. " * 50)
    (tmp / "data.csv").write_text("text\nhello\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (tmp / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["no text column"]}), tmp / "nocol.parquet")
    return {
        "missing": (str(tmp / "nope.txt"), "bpe:300", "data source not found"),
        "empty_txt": (str(tmp / "empty.txt"), "bpe:300", "holds no text"),
        "jsonl_without_text": (str(tmp / "notext.jsonl"), "bpe:300", r"notext.jsonl:2: .*'text' string"),
        "jsonl_text_not_string": (str(tmp / "nonstr.jsonl"), "bpe:300", r"nonstr.jsonl:1: .*'text' string"),
        "invalid_json": (str(tmp / "broken.jsonl"), "bpe:300", "invalid JSON"),
        "folder_without_text_files": (str(tmp / "nofiles"), "bpe:300", r"no \.txt, \.jsonl, \.parquet files"),
        "bad_tokenizer_spec": (str(tmp / "good.txt"), "gpt2", "bad tokenizer 'gpt2'"),
        "bpe_too_small": (str(tmp / "good.txt"), "bpe:100", "at least 259"),
        "unsupported_suffix": (str(tmp / "data.csv"), "bpe:300", "unsupported file type '.csv'"),
        "not_utf8": (str(tmp / "latin1.txt"), "bpe:300", "not UTF-8"),
        "corrupt_parquet": (str(tmp / "corrupt.parquet"), "bpe:300", "not a valid parquet file"),
        "parquet_without_text_column": (str(tmp / "nocol.parquet"), "bpe:300", r"no 'text' column \(columns: body\)"),
    }


BAD = [
    "missing", "empty_txt", "jsonl_without_text", "jsonl_text_not_string", "invalid_json",
    "folder_without_text_files", "bad_tokenizer_spec", "bpe_too_small", "unsupported_suffix", "not_utf8",
    "corrupt_parquet", "parquet_without_text_column"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, case):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    source, tokenizer, message = _bad_cases(src_dir)[case]
    parent = tmp_path / "outparent"
    parent.mkdir()
    before = leftovers(src_dir)
    with pytest.raises(TinyMixtralError, match=message) as e:
        D.prepare(source, parent / "out", tokenizer, val_fraction=0.1)
    assert "\n" not in str(e.value)
    assert leftovers(parent) == [] and leftovers(src_dir) == before


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_val_fraction(tmp_path, fraction):
    src = write_txt(tmp_path / "c.txt", make_docs(20))
    with pytest.raises(TinyMixtralError, match="val-fraction"):
        D.prepare(str(src), tmp_path / "out", "bpe:300", val_fraction=fraction)
    assert leftovers(tmp_path) == ["c.txt"]


def _check_cli_error(proc, tmp_path):
    """One error line, exit 2, and no output directory (not even a temporary one) left behind."""
    assert_one_line_error(proc, "prepare", 2)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_prepare_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    cases = _bad_cases(src_dir)
    for case in ("missing", "corrupt_parquet"):  # a real process: its exit status and stderr
        source, tokenizer, message = cases[case]
        _check_cli_error(run_cli("prepare", source, "--out", tmp_path / "out", "--tokenizer", tokenizer, cwd=tmp_path),
                         tmp_path)
    for case in ("invalid_json", "bad_tokenizer_spec", "not_utf8", "jsonl_without_text"):  # in-process: faster
        source, tokenizer, message = cases[case]
        _check_cli_error(call_cli(capsys, "prepare", source, "--out", tmp_path / "out", "--tokenizer", tokenizer),
                         tmp_path)


def test_prepare_cli_success(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(120))
    r = run_cli("prepare", src, "--out", "data", "--tokenizer", "bpe:300", "--val-fraction", "0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert f"train {meta['train_tokens']:,} tokens" in r.stdout and "uint16" in r.stdout
    check_prepared(tmp_path / "data", make_docs(120), 0.1)


class _FakeTok:
    unk_id = 0

    def __init__(self, ids):
        self.ids = ids

    def encode_batch(self, texts, bos=False, eos=False):
        return [self.ids for _ in texts]


def test_write_tokens_uses_the_whole_dtype_range(tmp_path):
    stats = D.write_tokens(["x", "y"], _FakeTok([1, 65535, 2]), tmp_path / "a.bin", np.uint16, desc="t")
    assert stats == {"tokens": 6, "bytes": 2, "docs": 2}
    assert np.fromfile(tmp_path / "a.bin", dtype=np.uint16).tolist() == [1, 65535, 2] * 2
    with pytest.raises(TinyMixtralError, match="token id 65536 does not fit uint16"):
        D.write_tokens(["x"], _FakeTok([1, 65536, 2]), tmp_path / "b.bin", np.uint16, desc="t")
    with pytest.raises(TinyMixtralError, match="cannot encode this data"):
        D.write_tokens(["x"], _FakeTok([1, 0, 0, 2]), tmp_path / "c.bin", np.uint16, desc="t")


@pytest.mark.parametrize("n_fit,requested", [(183, 160), (10, 6), (7, 7), (12, 11), (5, 1)])
def test_eval_windows_spread_over_the_whole_split(n_fit, requested):
    """A split of 1-2x the requested windows once read only its first windows; now they reach its end."""
    seq = 16
    n_tokens = n_fit * seq + 1 + 5  # a few tokens too few for one more window
    starts = D.window_starts(n_tokens, requested, seq, 1)
    assert len(starts) == requested and starts[0] == 0
    assert all(b - a >= seq for a, b in zip(starts, starts[1:]))  # no overlap
    assert all(s + seq + 1 <= n_tokens for s in starts)  # every window fits
    if requested > 1:
        assert starts[-1] == (n_fit - 1) * seq  # the last window that fits: the end of the split is read
    assert D.window_starts(n_tokens, n_fit, seq, None) == [i * seq for i in range(n_fit)]  # all of them


def test_prepare_never_replaces_a_file_a_foreign_directory_or_the_current_one(tmp_path, docs, monkeypatch):
    """prepare replaces its --out whole: a directory that is not prepared data is refused, not deleted."""
    src = write_txt(tmp_path / "c.txt", docs[:20])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path)
    for out, message in [(tmp_path / "mine", "holds no prepared data"), (tmp_path / "f", "is a file"),
                         ("", "is the current directory"), (".", "is the current directory"),
                         (tmp_path.parent, "is the current directory (or above it)")]:
        with pytest.raises(TinyMixtralError, match=re.escape(message)):
            D.prepare(str(src), out, "bpe:300", val_fraction=0.1)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work" and (tmp_path / "f").read_text() == "x"
    with pytest.raises(TinyMixtralError, match="--max-docs must be >= 1, got 0"):  # 0 was silently "all"
        D.prepare(str(src), tmp_path / "new", "bpe:300", max_docs=0)
