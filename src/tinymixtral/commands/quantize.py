"""`tinymixtral quantize`: an int8 / int4 weight-only quantized model directory."""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoint import has_tokenizer, load_model, save_model
from ..config import ModelConfig
from ..errors import TinyMixtralError
from ..quantize import make_settings


def add_arguments(p):
    p.epilog = ("The quantized directory records its settings in config.json and loads with tinymixtral "
                "(load_model, generate, eval, params), not with transformers (which would read the integers as "
                "weights, with only a warning). Router, embeddings and norms stay "
                "in full precision; an untied LM head is quantized.")
    p.add_argument("--model", required=True, help="a full-precision model directory")
    p.add_argument("--bits", type=int, required=True, help="8: int8 per output channel; 4: int4 in groups")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size along the input dim: 32, 64, 128 or 256 (default 32)")
    p.add_argument("--out", required=True, help="the quantized model directory to write")


def run(args) -> int:
    src, out = Path(args.model), Path(args.out)
    if not (src / "config.json").is_file():
        raise TinyMixtralError(f"no model directory (config.json) at {src}")
    if out.resolve() == src.resolve():
        raise TinyMixtralError("--out must differ from --model (the full-precision model is kept)")
    make_settings(ModelConfig.load(src), args.bits, args.group_size)  # bad flags fail before the weights are read
    t0 = time.perf_counter()
    qmodel = load_model(src, bits=args.bits, group_size=args.group_size)  # quantized tensor by tensor
    tokenizer = src if has_tokenizer(src) else None
    save_model(qmodel, out, tokenizer=tokenizer)
    q = qmodel.cfg.quantization
    kind = "int8 per channel" if q["bits"] == 8 else f"int4 groups of {q['group_size']}"
    print(f"wrote {out}: {kind}, {_size(out) / 1e6:.2f} MB of weights (was {_size(src) / 1e6:.2f} MB); "
          f"kept in full precision: {', '.join(q['skip'])} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _size(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("model*.safetensors"))
