"""`tinymixtral routes`: router statistics and pictures for a model on some text.

Runs the model over a text file or a prepared data split, reads each MoE layer's routing after the
forward (the model's code is untouched), and reports per layer: the load of each expert as first and
second choice, router entropy, load imbalance, how often consecutive tokens are routed alike compared
with chance, expert co-selection and each expert's most frequent tokens. With --out it writes
routes.json, routes.txt, load_heatmap.png, repeat_rate.png and routes_layer{L}.html.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..analysis import report
from ..analysis.stats import collect_routing, summarize
from ..build import pick_device
from ..checkpoint import load_model
from . import add_load_options, load_options
from ..config import ModelConfig
from ..data import check_tokenizer, load_split
from ..errors import TinyMixtralError
from ..tokenizer import load_tokenizer


def read_sequences(model_cfg, tok, text: str | None, data: str | None, split: str, max_tokens: int,
                   seq_len: int) -> tuple[list[torch.Tensor], str]:
    """Token id sequences (rows of at most seq_len) from a text file or a data split, and a description."""
    if text is not None:
        path = Path(text)
        if not path.is_file():
            raise TinyMixtralError(f"text file not found: {path}")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TinyMixtralError(f"{path}: not UTF-8 text") from None
        if not content.strip():
            raise TinyMixtralError(f"{path} holds no text")
        if tok is None:
            raise TinyMixtralError("--text needs the model's tokenizer, but its directory has none; use --data")
        ids = tok.encode(content, bos=True)
        source = f"{path} ({len(ids):,} tokens)"
    else:
        arr, meta = load_split(data, split)
        if meta["vocab_size"] > model_cfg.vocab_size:
            raise TinyMixtralError(f"the data's tokenizer has {meta['vocab_size']} tokens, the model only "
                                   f"{model_cfg.vocab_size}: this data was not prepared for this model")
        ids = arr[:max_tokens].astype("int64").tolist()
        source = f"{data} ({split} split, first {len(ids):,} tokens)"
    if len(ids) > max_tokens:
        print(f"routes: using the first {max_tokens:,} of {len(ids):,} tokens (--max-tokens)", file=sys.stderr)
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise TinyMixtralError("need at least 2 tokens to look at routing")
    rows = [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return rows, source


def token_pieces(tok, ids: list[int], window: int = 8) -> list[str]:
    """The text each token adds, decoding a few tokens of context so multi-byte characters come out whole."""
    if tok is None:
        return [f"[{i}]" for i in ids]
    special = {tok.bos_id: "<s>", tok.eos_id: "</s>"}
    out = []
    for i, t in enumerate(ids):
        if t in special:
            out.append(special[t])
            continue
        s = max(0, i - window)
        while s < i and ids[s] in special:  # keep specials out of the context (they decode to nothing)
            s += 1
        prev, full = tok.decode(ids[s:i]), tok.decode(ids[s:i + 1])
        piece = full[len(prev):] if full.startswith(prev) else tok.decode([t])
        out.append(piece or "·")
    return out


def write_outputs(out: Path, stats: dict, table_text: str, pieces: list[str], routing, layer: int,
                  title: str) -> list[Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinyMixtralError(f"cannot make the directory {out}: {e.strerror or e}") from None
    logits_NE, experts_NK = routing[layer]
    n = len(pieces)
    weights_NK = logits_NE[:n].softmax(dim=-1).gather(1, experts_NK[:n])
    weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    page = report.tokens_html(pieces, experts_NK[:n, 0].tolist(), experts_NK[:n].tolist(), weights_NK.tolist(),
                              stats["n_experts"], layer, title)
    return [report.write_text(out / "routes.json", json.dumps(stats, indent=1) + "\n"),
            report.write_text(out / "routes.txt", table_text),
            report.plot_load_heatmap(stats, out / "load_heatmap.png"),
            report.plot_repeat_rates(stats, out / "repeat_rate.png"),
            report.write_text(out / f"routes_layer{layer}.html", page)]


def add_arguments(p):
    p.add_argument("--model", required=True, help="a Mixtral model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file (encoded with the model's tokenizer, <s> first)")
    src.add_argument("--data", metavar="DIR", help="a prepared data directory (tinymixtral prepare)")
    p.add_argument("--split", default="val", help="split of --data (default: val)")
    p.add_argument("--max-tokens", type=int, default=4096, help="look at most at this many tokens (default 4096)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per forward (default: min(512, max_seq_len))")
    p.add_argument("--out", default=None, help="write routes.json, routes.txt, PNGs and the HTML page here")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON instead of the table")
    p.add_argument("--layer", type=int, default=0, help="layer of the HTML page, co-selection and top tokens")
    p.add_argument("--top-n", type=int, default=10, help="most frequent tokens listed per expert")
    p.add_argument("--html-tokens", type=int, default=2000, help="tokens shown in the HTML page (default 2000)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_load_options(p)


def run(args) -> int:
    for name in ("max_tokens", "top_n", "html_tokens"):
        if getattr(args, name) < 1:
            raise TinyMixtralError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.text is not None and not Path(args.text).is_file():  # before loading the model: fail fast
        raise TinyMixtralError(f"text file not found: {args.text}")
    cfg = ModelConfig.load(Path(args.model) / "config.json") if Path(args.model).is_dir() else None
    if cfg is not None:
        if not cfg.is_moe:
            raise TinyMixtralError(f"{args.model} is a dense model (no router): routes needs a Mixtral (MoE) model")
        if not 0 <= args.layer < cfg.n_layers:
            raise TinyMixtralError(f"--layer {args.layer} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    if args.data is not None:  # before loading the model: data of another tokenizer are refused
        check_tokenizer(args.data, load_split(args.data, args.split)[1], args.model)
    device = pick_device(args.device)
    model = load_model(args.model, device=device, **load_options(args, torch.float32))
    seq_len = min(512, model.cfg.max_seq_len) if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= model.cfg.max_seq_len:
        raise TinyMixtralError(f"--seq-len must be between 1 and the model's max_seq_len ({model.cfg.max_seq_len})")
    try:
        tok = load_tokenizer(args.model)
    except TinyMixtralError:
        tok = None
    rows, source = read_sequences(model.cfg, tok, args.text, args.data, args.split, args.max_tokens, seq_len)
    routing = collect_routing(model, rows)
    tokens_N = torch.cat(rows)
    stats = summarize(routing, tokens_N, [len(r) for r in rows], args.top_n)
    stats = {"model": str(args.model), "source": source, **stats}
    def piece_of(i: int) -> str:
        return token_pieces(tok, [i])[0]

    for lay in stats["layers"]:
        for toks in lay["top_tokens"]:
            for t in toks:
                t["text"] = piece_of(t["id"])
    text = report.table(stats, args.layer, piece_of)
    if args.out:
        pieces = token_pieces(tok, tokens_N[:args.html_tokens].tolist())
        written = write_outputs(Path(args.out), stats, text, pieces, routing, args.layer,
                                f"{args.model} on {source}")
    print(json.dumps(stats) if args.json else f"{args.model} on {source}\n{text}", end="\n" if args.json else "")
    if args.out and not args.json:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
