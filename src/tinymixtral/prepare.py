"""`tinymixtral prepare`: text source -> tokenized train/val shards (numpy memmap) + meta.json.

A prepared data directory holds `train.bin` and `val.bin` (token ids, uint16 when the vocabulary
fits, else uint32; every document is <s> text </s>), `meta.json` (tokenizer and its identity, dtype,
token, byte and document counts: bytes are what bits-per-byte is measured against) and `tokenizer/`.
Data with conversations (chats.py) also hold `train.mask.bin` / `val.mask.bin`: one uint8 per token,
1 where the token is trained (meta.json "loss_mask": true). data.py reads them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .chats import chat_text, encode_conversation, loss_bytes, parse_conversation
from .errors import TinyMixtralError
from .stories import CORPUS_DESCRIPTION, generate_stories
from .tokenizer import load_tokenizer, parse_tokenizer_spec, train_bpe

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
VAL_SPLITS = ("validation", "val", "test")  # a folder's val split: the first of these it holds
DOC_SEPARATOR = "<|endoftext|>"  # TinyStories' separator in its .txt dumps


# ---- sources: each returns {"train": [texts], "val": [texts] or None} -----------------------------
def read_source(source: str, num_stories: int = 50_000, seed: int = 0) -> tuple[dict, dict]:
    """Documents of a source ('stories', 'tinystories', a HF dataset dir, a file or a folder) and its metadata."""
    if source == "stories":
        texts = generate_stories(num_stories, seed=seed)
        return {"train": texts, "val": None}, {"source": "stories", "synthetic": True,
                                                "description": CORPUS_DESCRIPTION}
    if source == "tinystories":
        return load_hf_dataset("roneneldan/TinyStories"), {
            "source": "tinystories", "synthetic": True,
            "description": "TinyStories (Eldan & Li 2023): GPT-3.5/4-written stories for 3-4 year olds"}
    path = Path(source)
    if not path.exists():
        raise TinyMixtralError(f"data source not found: {source} (use 'stories', 'tinystories', a file or a folder)")
    if path.is_dir() and _is_hf_dataset_dir(path):
        return load_hf_dataset(str(path)), {"source": str(path), "synthetic": False}
    if path.is_dir() and (splits := _txt_splits(path)):
        return splits, {"source": str(path), "synthetic": False}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise TinyMixtralError(f"no {', '.join(TEXT_SUFFIXES)} files in {path}")
    texts = [t for f in files for t in read_file(f)]
    return {"train": texts, "val": None}, {"source": str(path), "synthetic": False}


def read_file(path: Path) -> list:
    """Documents of one local file: .txt (split at <|endoftext|>; without one, the file is one document),
    .jsonl, .parquet.
    A .jsonl line is a text ({"text": ...}) or a conversation ({"messages": [...]}, a list of messages)."""
    if path.suffix not in TEXT_SUFFIXES:
        raise TinyMixtralError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet")
    try:
        if path.suffix == ".txt":
            raw = path.read_text(encoding="utf-8")
            parts = raw.split(DOC_SEPARATOR) if DOC_SEPARATOR in raw else [raw]
            return [p.strip() for p in parts if p.strip()]
        if path.suffix == ".jsonl":
            docs = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TinyMixtralError(f"{path}:{n}: invalid JSON ({e})") from None
                if isinstance(row, dict) and "messages" in row:
                    docs.append(parse_conversation(row, f"{path}:{n}"))
                elif not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise TinyMixtralError(f"{path}:{n}: each line must be a JSON object with a 'text' string "
                                           "or a 'messages' list")
                else:
                    docs.append(row["text"])
            return docs
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as e:  # ArrowInvalid (not parquet, corrupt) is a ValueError, not an OSError
            raise TinyMixtralError(f"{path}: not a valid parquet file ({str(e).splitlines()[0]})") from None
        if "text" not in table.column_names:
            raise TinyMixtralError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    except UnicodeDecodeError:
        raise TinyMixtralError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TinyMixtralError(f"{path}: invalid JSON ({e})") from None
    except ImportError:
        raise TinyMixtralError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    except OSError as e:
        raise TinyMixtralError(f"{path}: cannot read ({e})") from None


def load_hf_dataset(name_or_path: str) -> dict:
    """train/validation texts through `datasets.load_dataset` (TinyStories on the Hub, or a local copy)."""
    try:
        import datasets
    except ImportError:
        raise TinyMixtralError("this source needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name_or_path)
    except Exception as e:  # network, missing files, bad format: datasets raises many types
        raise TinyMixtralError(f"cannot load dataset {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if "train" not in ds:
        raise TinyMixtralError(f"dataset {name_or_path!r} has no train split (splits: {', '.join(ds)})")
    if "text" not in ds["train"].column_names:
        raise TinyMixtralError(f"dataset {name_or_path!r} has no 'text' column")
    val = next((ds[s] for s in ("validation", "val", "test") if s in ds), None)
    return {"train": ds["train"]["text"], "val": val["text"] if val is not None else None}


def _split_name(p: Path) -> str:
    return p.stem.split("-")[0]  # train.jsonl, train-00000-of-00002.parquet: "train"


def _is_hf_dataset_dir(path: Path) -> bool:
    """A folder laid out as dataset splits (train.* and validation.* files) is read with `datasets`."""
    names = {_split_name(p) for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet", ".csv")}
    return "train" in names and bool(names & set(VAL_SPLITS))


def _txt_splits(path: Path) -> dict | None:
    """The splits of a folder of split-named .txt files (train.txt with validation.txt, val.txt or test.txt;
    shards such as train-00000-of-00002.txt too), read as the other formats' splits are; None for any other folder."""
    by_split = {}
    for f in sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file()):
        by_split.setdefault(_split_name(f), []).append(f)
    val = next((s for s in VAL_SPLITS if s in by_split), None)
    if "train" not in by_split or val is None:
        return None
    split_files = {f for s in ("train", *VAL_SPLITS) for f in by_split.get(s, [])}
    others = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES
                    and p not in split_files)
    if others:  # neither split would say where they belong
        raise TinyMixtralError(f"{path} holds train/{val} .txt files and other text files ({', '.join(others[:3])}"
                               f"{', ...' if len(others) > 3 else ''}): move those out, or rename them train-*.txt")
    return {"train": [t for f in by_split["train"] for t in read_file(f)],
            "val": [t for f in by_split[val] for t in read_file(f)]}


# ---- prepare ---------------------------------------------------------------------------------------
def prepare(source: str, out: str | Path, tokenizer: str = "bpe:4096", val_fraction: float = 0.02,
            num_stories: int = 50_000, seed: int = 0, max_docs: int | None = None, val_file: str | None = None) -> dict:
    """Tokenize a source into OUT/{train,val}.bin + meta.json + tokenizer/ (written atomically).

    tokenizer: 'mistral', 'bpe:N' (trained here on the train split) or a directory with tokenizer files
    (a model directory: the data are then prepared for that model).
    The val split is the source's own (a dataset's validation split), else `val_file` (any file or folder
    source), else a seeded val_fraction of the documents (of a single document: its tail)."""
    if not 0 < val_fraction < 1:
        raise TinyMixtralError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if max_docs is not None and max_docs < 1:
        raise TinyMixtralError(f"--max-docs must be >= 1, got {max_docs}")
    out = Path(out)
    _check_out(out)
    kind, size = ("dir", None) if Path(tokenizer).is_dir() else parse_tokenizer_spec(tokenizer)
    splits, meta = read_source(source, num_stories=num_stories, seed=seed)
    train = [t for t in splits["train"] if _has_text(t)]
    if max_docs:
        train = train[:max_docs]
    if not train:
        raise TinyMixtralError(f"data source {source} holds no text")
    val = [t for t in splits["val"] if _has_text(t)] if splits["val"] is not None else None
    if val_file is not None:
        if val:
            raise TinyMixtralError(f"{source} has a validation split of its own; drop --val-file")
        val = [t for t in read_source(val_file)[0]["train"] if _has_text(t)]
        if not val:
            raise TinyMixtralError(f"--val-file {val_file} holds no text")
        meta["val_source"] = str(val_file)
    if val is None or not val:
        train, val = split_docs(train, val_fraction, seed)
    elif max_docs:
        val = val[: max(1, int(max_docs * val_fraction))]
    if kind == "bpe":
        print(f"training a byte-level BPE of {size} tokens on {len(train):,} documents")
        tok = train_bpe([d if isinstance(d, str) else chat_text(d) for d in train], size)
    else:
        tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    chat = any(not isinstance(d, str) for d in train + val)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        stats = {}
        for name, texts in (("train", train), ("val", val)):
            stats[name] = write_tokens(texts, tok, tmp / f"{name}.bin", dtype, desc=f"tokenizing {name}",
                                       mask_path=tmp / f"{name}.mask.bin" if chat else None)
        tok.save(tmp / "tokenizer")
        meta.update({
            "tokenizer": tokenizer, "tokenizer_id": tok.identity(), "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "loss_mask": chat,
            **{f"{s}_{k}": v for s, d in stats.items() for k, v in d.items()},
        })
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only directory: nothing half-written is left
            raise TinyMixtralError(f"cannot write {out}: {e.strerror or e}") from e
        raise
    return meta


def _check_out(out: Path):
    """prepare replaces what is at `out`: only ever a prepared data directory, an empty one, or nothing."""
    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise TinyMixtralError(f"--out {str(out) or repr('')} is the current directory (or above it): give a new one")
    if out.exists() and not out.is_dir():
        raise TinyMixtralError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise TinyMixtralError(f"--out {out} is a directory that holds no prepared data (no meta.json): it would be "
                               "replaced; give a new or empty directory")


def _has_text(doc) -> bool:
    return bool(doc.strip()) if isinstance(doc, str) else bool(doc)


def split_docs(docs: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded document-level split; a single text document is split by characters instead."""
    if len(docs) == 1 and isinstance(docs[0], str):
        cut = int(len(docs[0]) * (1 - fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(docs) * fraction))
    val_idx = set(idx[:n_val])
    return [d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx]


def write_tokens(texts: list, tok, path: Path, dtype, desc: str, batch: int = 2048,
                 mask_path: Path | None = None) -> dict:
    """Encode documents (texts as <s> text </s>; conversations as chats.encode_conversation) in batches into
    a flat memmap file, and with mask_path their loss mask into another; returns counts."""
    total_bytes = sum(len(t.encode("utf-8")) if isinstance(t, str) else sum(len(m["content"].encode("utf-8"))
                      for m in t) for t in texts)
    chunks, masks, n_tokens, unk = [], [], 0, 0
    with tqdm(total=len(texts), desc=desc, unit="doc", unit_scale=True, leave=False) as bar:
        for i in range(0, len(texts), batch):
            part = texts[i:i + batch]
            encoded = iter(tok.encode_batch([t for t in part if isinstance(t, str)], bos=True, eos=True))
            ids, mask = [], []
            for doc in part:
                row, m = (next(encoded), None) if isinstance(doc, str) else encode_conversation(tok, doc)
                ids.append(row)
                mask.append([1] * len(row) if m is None else m)
            arr = np.fromiter((t for seq in ids for t in seq), dtype=np.int64)
            if mask_path is not None:
                masks.append(np.fromiter((t for seq in mask for t in seq), dtype=np.uint8))
            if arr.size and arr.max() > np.iinfo(dtype).max:
                raise TinyMixtralError(f"token id {arr.max()} does not fit {np.dtype(dtype).name}")
            if getattr(tok, "unk_id", None) is not None:
                unk += int((arr == tok.unk_id).sum())
            chunks.append(arr.astype(dtype))
            n_tokens += arr.size
            bar.update(len(texts[i:i + batch]))
    if unk > 0.01 * n_tokens:
        raise TinyMixtralError(f"the tokenizer cannot encode this data: {unk:,} of {n_tokens:,} tokens are <unk>")
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(n_tokens,))
    pos = 0
    for c in chunks:
        mm[pos:pos + c.size] = c
        pos += c.size
    mm.flush()
    stats = {"tokens": n_tokens, "bytes": total_bytes, "docs": len(texts)}
    if mask_path is not None:
        mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
        mask.tofile(mask_path)
        stats.update(loss_tokens=int(mask.sum()), loss_bytes=sum(loss_bytes(t) for t in texts))
    return stats
