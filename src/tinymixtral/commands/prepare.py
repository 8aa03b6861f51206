"""`tinymixtral prepare`: a text source -> tokenized train/val shards."""

from __future__ import annotations

from ..prepare import prepare


def add_arguments(p):
    p.add_argument("source", help="'stories' (offline, synthetic), 'tinystories' (needs network), a file or a folder "
                   "(.jsonl lines: {\"text\": ...} or chat {\"messages\": [{\"role\", \"content\"}, ...]})")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--tokenizer", default="bpe:4096",
                   help="'mistral' (Mixtral's 32000), 'bpe:N' (trained here) or a model directory (its tokenizer)")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="share of documents held out (of a single document: its tail) when no val split is given")
    p.add_argument("--val-file", default=None, help="the val split from this file or folder (not held out of the source)")
    p.add_argument("--num-stories", type=int, default=50_000, help="how many stories the 'stories' source makes")
    p.add_argument("--max-docs", type=int, default=None, help="use at most this many training documents")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    meta = prepare(args.source, args.out, args.tokenizer, args.val_fraction, args.num_stories, args.seed,
                   args.max_docs, args.val_file)
    print(f"{args.out}: train {meta['train_tokens']:,} tokens ({meta['train_docs']:,} docs), "
          f"val {meta['val_tokens']:,} tokens, vocab {meta['vocab_size']}, {meta['dtype']}"
          + (f"; loss mask: {meta['train_loss_tokens']:,} trained (assistant) tokens" if meta["loss_mask"] else ""))
    return 0
