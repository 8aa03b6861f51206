"""`tinymixtral merge` against mergekit-moe 0.1.4 itself, on the same YAML and the same local dense models.

    PYTHONPATH=src python benchmarks/mergekit_parity.py [--venv /tmp/mergekit-0.1.4-venv]

mergekit pins its own versions, so it gets its own virtual environment (created on the first run: torch==2.13.0
first, which is the CPU wheel, then mergekit==0.1.4 with transformers<5, which 0.1.4 needs: with transformers 5
its `load_in_4bit` argument breaks the hidden-state gates). The dense models are random tiny Mistrals written by
transformers' save_pretrained, with a small BPE tokenizer. Each case runs `mergekit-moe CONFIG OUT --device cpu`
and `tinymixtral merge CONFIG --out OUT`, then compares: the tensor names, every copied tensor bit for bit (dtype
included), each router row (max abs difference, and in bf16 ulps of the row's largest entry) and the config.json
fields that change how the model loads. Writes benchmarks/mergekit_parity.result.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tinymixtral.checkpoint import read_safetensors
from tinymixtral.merging import merge
from tinymixtral.tokenizer import train_bpe

HERE = Path(__file__).resolve().parent
LOAD_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
               "sliding_window", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
               "vocab_size", "dtype", "router_aux_loss_coef", "router_jitter_noise", "bos_token_id", "eos_token_id")
PROMPTS = {"animals": ["the cat sat on the mat", "a dog ran to the park", "the bird and the fox"],
           "sums": ["3 + 4 = 7", "10 - 2 = 8", "6 + 6 = 12 and 2 + 2 = 4"]}


def venv(path: Path) -> tuple[Path, float]:
    """mergekit-moe 0.1.4 in its own venv (built once); returns the executable and the build time in s (0 if cached)."""
    exe = path / "bin" / "mergekit-moe"
    if exe.is_file():
        return exe, 0.0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # first: the CPU wheel, not a multi-GB CUDA one
    subprocess.run(pip + ["mergekit==0.1.4", "transformers<5"], check=True)
    return exe, time.perf_counter() - t0


def dense_dirs(root: Path, split_special_tokens: bool) -> None:
    """base, e0, e1: random tiny Mistrals (vocab 300, d 64, 2 layers, std 0.1) saved by transformers, with a BPE."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = train_bpe([" ".join(p for ps in PROMPTS.values() for p in ps)] * 20, 300)
    cfg = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                        sliding_window=32, rope_theta=1e4, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    for seed, name in enumerate(("base", "e0", "e1")):
        torch.manual_seed(seed)
        m = MistralForCausalLM(cfg)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.uniform_(0.5, 1.5) if n.endswith("norm.weight") else p.normal_(0, 0.1)
        m.save_pretrained(root / name)
        tok.save(root / name)
        conf = root / name / "tokenizer_config.json"
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "split_special_tokens": split_special_tokens}))


def ulps(x: torch.Tensor) -> float:
    """One bf16 ulp at the largest magnitude of x."""
    return 2.0 ** (math.floor(math.log2(x.abs().max().item())) - 7)


def compare(ours: Path, theirs: Path) -> dict:
    a, b = read_safetensors(ours), read_safetensors(theirs)
    routers, copied_differ = {}, []
    for k in sorted(set(a) & set(b)):
        if k.endswith("block_sparse_moe.gate.weight"):
            d = (a[k].float() - b[k].float()).abs()
            routers[k] = {"max_abs_diff": d.max().item(), "bf16_ulps": max(
                (d[e].max().item() / ulps(b[k][e].float()) for e in range(d.shape[0])), default=0.0),
                "same_dtype": a[k].dtype == b[k].dtype}
        elif a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            copied_differ.append(k)
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    return {"names_equal": a.keys() == b.keys(), "copied_tensors": len(a) - len(routers),
            "copied_bit_identical": not copied_differ, "copied_differ": copied_differ, "routers": routers,
            "config_fields_differ": {f: [ca.get(f), cb.get(f)] for f in LOAD_FIELDS if ca.get(f) != cb.get(f)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/mergekit-0.1.4-venv"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergekit-parity"))
    ap.add_argument("--out", type=Path, default=HERE / "mergekit_parity.result.json")
    args = ap.parse_args()
    exe, build_s = venv(args.venv)
    results = {"mergekit": "0.1.4", "venv_build_s": round(build_s, 1), "cases": {}}
    cases = [("hidden", "bfloat16", True), ("hidden", "float32", True), ("hidden", "bfloat16", False),
             ("cheap_embed", "float32", True), ("cheap_embed", "bfloat16", False)]
    for mode, dtype, split in cases:
        name = f"{mode}-{dtype}-{'split' if split else 'bos'}"
        root = args.work / name
        dense_dirs(root, split)
        spec = {"base_model": "base", "gate_mode": mode, "dtype": dtype, "experts_per_token": 1,
                "experts": [{"source_model": "e0", "positive_prompts": PROMPTS["animals"],
                             "negative_prompts": PROMPTS["sums"][:1]},
                            {"source_model": "e1", "positive_prompts": PROMPTS["sums"]}]}
        (root / "moe.yaml").write_text(yaml.safe_dump(spec))
        r = subprocess.run([str(exe), "moe.yaml", "mk", "--device", "cpu"], cwd=root, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"mergekit-moe failed on {name}:\n{r.stderr[-3000:]}")
        merge(root / "moe.yaml", root / "ours")
        results["cases"][name] = compare(root / "ours", root / "mk")
        worst = max(v["bf16_ulps"] for v in results["cases"][name]["routers"].values())
        print(f"{name}: copied bit-identical {results['cases'][name]['copied_bit_identical']}, router rows within "
              f"{worst:.1f} bf16 ulps, config differs in {results['cases'][name]['config_fields_differ'] or 'nothing'}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
