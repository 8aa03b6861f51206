"""`tinymixtral convert`: a model directory between Hugging Face's format and Mistral's native one."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import has_tokenizer, load_model, model_format, save_model
from ..errors import TinyMixtralError
from . import DTYPES


def add_arguments(p):
    p.add_argument("--model", required=True, help="a model directory (HF or Mistral-native, told apart by its files)")
    p.add_argument("--to", required=True, choices=("hf", "mistral"),
                   help="hf: config.json + model*.safetensors; mistral: params.json + consolidated.safetensors")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: as stored)")


def run(args) -> int:
    src, out = Path(args.model), Path(args.out)
    if out.exists() and out.resolve() == src.resolve():
        raise TinyMixtralError("--out must differ from --model")
    if src.is_dir():
        model_format(src)  # a mixed directory fails before anything is read
    model = load_model(src, dtype=DTYPES[args.dtype] if args.dtype else None)
    save_model(model, out, tokenizer=src if has_tokenizer(src) else None, format=args.to)
    print(f"wrote {out} ({'Hugging Face' if args.to == 'hf' else 'Mistral native'} format, "
          f"{model.num_params():,} parameters, {next(model.parameters()).dtype})")
    return 0
