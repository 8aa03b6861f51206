"""Tokenizers behind one interface: Mixtral's own SentencePiece model ("mistral") and byte-level BPEs ("bpe:N").

Both kinds use Mistral's special ids: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), and have no pad token. Text that
happens to spell "<s>" is encoded as plain text; BOS/EOS only come from the bos/eos flags, and Mistral's newer
control tokens ([INST], [/INST], ... in tokenizer.model.v3) only from the chat template (`control`).

A model directory holds tokenizer.model or tokenizer.json (what transformers writes), or, in Mistral's native
layout, tokenizer.model.v1 / .v3 / .v7 (the same SentencePiece format) or tekken.json (not read here).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from .errors import TinyMixtralError

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
MIN_BPE_VOCAB = 256 + 3  # every byte + the three special tokens
VERSIONED = re.compile(r"tokenizer\.model\.v(\d+)(?:m(\d+))?")  # Mistral's native names: .v3, .v7m1, ...


class Tokenizer:
    """A SentencePiece model (kind "mistral") or a `tokenizers` byte-level BPE (kind "bpe")."""

    def __init__(self, backend: spm.SentencePieceProcessor | HFTokenizer):
        """Wrap a loaded sentencepiece or tokenizers backend.

        `control` maps the special tokens' text to their ids: <unk>, <s>, </s>, and in Mistral's newer
        vocabularies [INST], [/INST], [TOOL_CALLS], ... (SentencePiece control pieces; tokenizer.json's special
        added tokens). encode() never produces them from text; the chat template puts them in by id."""
        self._backend = backend
        if isinstance(backend, spm.SentencePieceProcessor):
            self.kind, self.vocab_size = "mistral", backend.vocab_size()
            self.bos_id, self.eos_id = backend.bos_id(), backend.eos_id()
            self.pad_id = backend.pad_id() if backend.pad_id() >= 0 else None
            self.control = {backend.id_to_piece(i): i for i in range(self.vocab_size)
                            if backend.is_control(i) or backend.is_unknown(i)}
        else:
            self.kind, self.vocab_size = "bpe", backend.get_vocab_size()
            self.bos_id, self.eos_id = backend.token_to_id(BOS), backend.token_to_id(EOS)
            self.pad_id = backend.token_to_id("<pad>")
            backend.encode_special_tokens = True  # "<s>" inside text is text, as in sentencepiece
            self.control = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        if self.bos_id is None or self.bos_id < 0 or self.eos_id is None or self.eos_id < 0:
            raise TinyMixtralError(f"tokenizer has no {BOS} / {EOS} tokens")

    @property
    def instruct_format(self) -> str:
        """Which of Mistral's instruct formats the vocabulary is made for (instruct.chat_template renders them):
        "v7" with [SYSTEM_PROMPT] control tokens, "v3" with [INST] / [/INST] control tokens (also the v2 files),
        else "v1" (Mixtral-8x7B's tokenizer and ours: the markers are plain text)."""
        if {"[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"} <= self.control.keys():
            return "v7"
        return "v3" if {"[INST]", "[/INST]"} <= self.control.keys() else "v1"

    def identity(self) -> str:
        """What makes two tokenizers interchangeable: a hash of the vocabulary (every token's text, by id).

        Prepared data record it (meta.json "tokenizer_id"); a model meets data only with the same identity.
        A SentencePiece model and its `tokenizers` copy in tokenizer.json have the same one.
        """
        if self.kind == "mistral":
            pieces = [self._backend.id_to_piece(i) for i in range(self.vocab_size)]
        else:
            by_id = {i: p for p, i in self._backend.get_vocab(with_added_tokens=True).items()}
            pieces = [by_id.get(i) for i in range(self.vocab_size)]
        return "vocab-sha256:" + hashlib.sha256(json.dumps(pieces).encode()).hexdigest()[:16]

    @property
    def backend(self) -> spm.SentencePieceProcessor | HFTokenizer:
        """The sentencepiece or tokenizers object underneath (what a GGUF export reads the vocabulary from)."""
        return self._backend

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of one text, optionally with BOS in front and EOS at the end."""
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Token ids of many texts at once (multi-threaded in the backend)."""
        if self.kind == "mistral":
            rows = self._backend.encode(list(texts))
        else:
            rows = [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        head, tail = [self.bos_id] * bos, [self.eos_id] * eos
        return [head + r + tail for r in rows] if bos or eos else rows

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of ids, special tokens dropped.

        SentencePiece drops the space in front of the first piece ("▁upon" alone decodes to "upon"), so to
        stream text, decode the whole sequence so far and emit what is new rather than decoding pieces alone.
        """
        ids = [int(i) for i in ids]  # also accepts tensors and numpy arrays
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TinyMixtralError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {self.vocab_size}")
        if self.kind == "mistral":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer files that both load_tokenizer and transformers' AutoTokenizer load to the same ids."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.kind == "mistral":
            _write(d / "tokenizer.model", self._backend.serialized_model_proto())
            backend = _spm_as_tokenizers(self._backend)
        else:
            (d / "tokenizer.model").unlink(missing_ok=True)  # a stale one would be loaded instead of ours
            backend = self._backend
        _write(d / "tokenizer.json", backend.to_str().encode())
        # Not LlamaTokenizer: transformers 5 rebuilds that one with its own Metaspace pre-tokenizer, which
        # tokenizes leading spaces differently (" x" -> [1318], not [28705, 1318]). The generic class uses
        # tokenizer.json as written; a Mixtral config.json beside it makes AutoTokenizer pick it anyway.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                  "unk_token": UNK, "add_bos_token": True, "add_eos_token": False,
                  "split_special_tokens": True, "clean_up_tokenization_spaces": False}
        _write(d / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _bos_template(tok: HFTokenizer) -> None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])


def _spm_as_tokenizers(sp: spm.SentencePieceProcessor) -> HFTokenizer:
    """The same SentencePiece BPE as a `tokenizers` BPE (the form transformers loads without conversion)."""
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    normal = {p: i for i, p in enumerate(pieces) if sp.is_unknown(i) + sp.is_control(i) + sp.is_byte(i) == 0}
    # SentencePiece applies the merge whose result scores highest, so rank merges by score, not by id:
    # "▁▁" has id 259 but the lowest score of all.
    merges = sorted((-sp.get_score(i), i, p[:k], p[k:]) for p, i in normal.items()
                    for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = HFTokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=UNK,
                                 fuse_unk=True, byte_fallback=True))
    # control pieces ([INST], ... of a v3 model) are special tokens there, as transformers marks them converting one
    tok.add_special_tokens([UNK] + [p for i, p in enumerate(pieces) if sp.is_control(i)])
    # One "▁" in front of the text (add_dummy_prefix) even if it starts with a space, which the Metaspace
    # pre-tokenizer would not do; no split at spaces: the vocabulary keeps words apart.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    _bos_template(tok)
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of vocab_size tokens (fewer if the texts have too few distinct pairs)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise TinyMixtralError(f"BPE vocab size {vocab_size} is too small: it needs at least {MIN_BPE_VOCAB}")
    tok = HFTokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    _bos_template(tok)
    return Tokenizer(tok)


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """ "mistral" -> ("mistral", None); "bpe:N" -> ("bpe", N); anything else -> TinyMixtralError."""
    if spec == "mistral":
        return "mistral", None
    m = re.fullmatch(r"bpe:(\d+)", spec)
    if not m:
        raise TinyMixtralError(f"bad tokenizer {spec!r}: expected 'mistral' or 'bpe:N' (e.g. bpe:4096)")
    n = int(m[1])
    if n < MIN_BPE_VOCAB:
        raise TinyMixtralError(f"bad tokenizer {spec!r}: a BPE needs at least {MIN_BPE_VOCAB} tokens")
    return "bpe", n


def load_tokenizer(spec_or_dir: str | Path) -> Tokenizer:
    """Load "mistral" (shipped with mistral-common) or a directory written by Tokenizer.save."""
    s = str(spec_or_dir)
    if s == "mistral":
        model = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
        return Tokenizer(spm.SentencePieceProcessor(model_proto=model.read_bytes()))
    d = Path(s)
    if not d.is_dir():
        if s.startswith("bpe:"):
            parse_tokenizer_spec(s)
            raise TinyMixtralError(f"tokenizer {s!r} cannot be loaded: it must be trained first (train_bpe), "
                                   "then loaded from the directory it was saved to")
        raise TinyMixtralError(f"tokenizer {s!r} is neither 'mistral' nor an existing directory")
    file = tokenizer_file(d)
    try:
        if file.name == "tokenizer.json":
            backend = HFTokenizer.from_file(str(file))
        else:
            backend = spm.SentencePieceProcessor(model_proto=file.read_bytes())
    except Exception as e:  # sentencepiece and tokenizers raise assorted types for a corrupt file
        raise TinyMixtralError(f"cannot load the tokenizer in {d}: {e}") from e
    return Tokenizer(backend)


def tokenizer_file(d: str | Path) -> Path:
    """The one file load_tokenizer reads in directory d.

    A SentencePiece model first: tokenizer.model.vN (the highest N if there are several), else tokenizer.model;
    else tokenizer.json. Mistral's Hub repositories ship tokenizer.model and tokenizer.model.v3 side by side,
    byte for byte the same; two that differ are refused, as is a tekken.json alone (not supported yet).
    """
    d = Path(d)
    versioned = sorted((f for f in d.glob("tokenizer.model.v*") if VERSIONED.fullmatch(f.name) and f.is_file()),
                       key=lambda f: tuple(int(x or 0) for x in VERSIONED.fullmatch(f.name).groups()))
    plain, tok_json = d / "tokenizer.model", d / "tokenizer.json"
    if versioned:
        if plain.is_file() and plain.read_bytes() != versioned[-1].read_bytes():
            raise TinyMixtralError(f"{d} holds two different SentencePiece tokenizers, tokenizer.model and "
                                   f"{versioned[-1].name}; keep the one the model was trained with")
        return versioned[-1]
    if plain.is_file():
        return plain
    if tok_json.is_file():
        return tok_json
    if (d / "tekken.json").is_file():
        raise TinyMixtralError(f"{d} has a tekken.json tokenizer (Mistral's tiktoken-based one), which is not "
                               "supported yet; only SentencePiece (tokenizer.model*) and tokenizer.json are")
    raise TinyMixtralError(f"no tokenizer.model, tokenizer.model.vN or tokenizer.json in {d}")
