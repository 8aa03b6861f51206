"""`tinymixtral export`: a model directory as a GGUF file for llama.cpp (and the tools built on it)."""

from __future__ import annotations

from ..export import TYPES, export_gguf


def add_arguments(p):
    p.epilog = ("Metadata, tensor names and layouts as llama.cpp's own converter writes a Mixtral/Mistral "
                "(architecture llama). llama.cpp attends over its whole context on this architecture, with no "
                "sliding window, so the context length written is capped at the model's window: within it, "
                "llama.cpp computes what tinymixtral computes. Needs the gguf package (extra [gguf]).")
    p.add_argument("--model", required=True, help="a full-precision model directory with its tokenizer")
    p.add_argument("--gguf", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f32", help=f"weight type: {', '.join(TYPES)} (default f32; norms and the "
                   "router stay f32)")
    p.add_argument("--full-context", action="store_true",
                   help="write the model's full max_seq_len as the context, past its sliding window")


def run(args) -> int:
    r = export_gguf(args.model, args.gguf, args.type, args.full_context)
    if r["capped"]:
        print(f"context length capped at the sliding window ({r['context_length']} tokens): llama.cpp has no "
              "window on this architecture, so past it the two would differ (--full-context writes the full length)")
    print(f"wrote {r['path']}: {r['type']}, {r['tensors']} tensors, {r['bytes'] / 1e6:.2f} MB, "
          f"context {r['context_length']}")
    return 0
