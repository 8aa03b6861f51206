"""Do the demo's stories keep their characters? Distinct character names per sampled story.

    python benchmarks/demo_names.py --model runs/demo/best --out benchmarks/demo_names.result.json

Samples what `tinymixtral generate --prompt "Once upon a time" --temperature 0.7 --top-k 40
--max-new-tokens 250 --seed S` writes, for seeds 0-19, and counts the distinct character names in each
story. The names are the offline story corpus's own lists (stories/words.py: the children's and the pets'
names), matched as whole, capitalised words: in that corpus such a word is always a character's name, so the
count is exact for it. The corpus itself names 1.4 characters per story and never more than 2 (--corpus
counts that again); the measure is how many of the 20 stories keep to at most 2.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from tinymixtral.errors import TinyMixtralError
from tinymixtral.stories import generate_stories
from tinymixtral.stories.words import BOY_NAMES, GIRL_NAMES, HE_PET_NAMES, SHE_PET_NAMES

NAMES = GIRL_NAMES + BOY_NAMES + SHE_PET_NAMES + HE_PET_NAMES
_NAME = re.compile(r"\b(" + "|".join(sorted(NAMES, key=len, reverse=True)) + r")\b")  # "Tim" is not in "Timmy"
PROMPT, TEMPERATURE, TOP_K, NEW_TOKENS, SEEDS, KEEP = "Once upon a time", 0.7, 40, 250, range(20), 2


def story_names(text: str) -> list[str]:
    """The distinct character names of a story, in the order they first appear."""
    return list(dict.fromkeys(_NAME.findall(text)))


def sample_story(model, tok, seed: int, prompt: str = PROMPT, max_new_tokens: int = NEW_TOKENS,
                 temperature: float = TEMPERATURE, top_k: int = TOP_K) -> str:
    """The story `tinymixtral generate` prints for this seed: the prompt and what follows, up to </s>."""
    from tinymixtral.generation import stream

    ids = tok.encode(prompt, bos=True)
    new = []
    for step in stream(model, [ids], max_new_tokens, temperature, top_k, None, seed, tok.eos_id):
        if int(step[0]) == tok.eos_id:
            break
        new.append(int(step[0]))
    return prompt + tok.decode(ids + new)[len(tok.decode(ids)):]


def summary(counts: list[int]) -> dict:
    """Distribution of names per story, the mean, and how many stories keep to at most KEEP names."""
    return {"distribution": {str(k): v for k, v in sorted(Counter(counts).items())},
            "mean_names": statistics.fmean(counts), "max_names": max(counts),
            f"at_most_{KEEP}": sum(c <= KEEP for c in counts), "stories": len(counts)}


def measure(model_dir: str, seeds=SEEDS, max_new_tokens: int = NEW_TOKENS) -> dict:
    """Every seed's story and its names, and the summary over them."""
    from tinymixtral.checkpoint import load_model
    from tinymixtral.tokenizer import load_tokenizer

    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    stories = []
    for seed in tqdm(list(seeds), unit="story", desc="sampling"):
        text = sample_story(model, tok, seed, max_new_tokens=max_new_tokens)
        names = story_names(text)
        stories.append({"seed": seed, "n_names": len(names), "names": names, "text": text})
    settings = {"prompt": PROMPT, "temperature": TEMPERATURE, "top_k": TOP_K, "max_new_tokens": max_new_tokens}
    return {"model": str(Path(model_dir).resolve()), "settings": settings,
            **summary([s["n_names"] for s in stories]), "samples": stories}


def corpus_reference(n: int, seed: int = 0) -> dict:
    """The same measure on n stories of the offline corpus itself."""
    return summary([len(story_names(s)) for s in generate_stories(n, seed)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True, help="a model directory (e.g. runs/demo/best)")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="sample seeds 0..N-1 (default 20)")
    ap.add_argument("--max-new-tokens", type=int, default=NEW_TOKENS, help=f"default {NEW_TOKENS}")
    ap.add_argument("--corpus", type=int, default=1000, help="also measure this many corpus stories (0: not)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        if args.seeds < 1 or args.max_new_tokens < 1 or args.corpus < 0:
            raise TinyMixtralError("--seeds and --max-new-tokens must be >= 1, --corpus >= 0")
        result = measure(args.model, range(args.seeds), args.max_new_tokens)
    except TinyMixtralError as e:
        print(f"demo_names: error: {e}", file=sys.stderr)
        return 2
    if args.corpus:
        result["corpus"] = corpus_reference(args.corpus)
    for s in result["samples"]:
        print(f"seed {s['seed']:>2}: {s['n_names']} names  {', '.join(s['names'])}")
    print(f"{result[f'at_most_{KEEP}']} of {result['stories']} stories keep to at most {KEEP} names; "
          f"mean {result['mean_names']:.2f} names per story; distribution {result['distribution']}")
    if args.corpus:
        c = result["corpus"]
        print(f"the corpus: mean {c['mean_names']:.2f}, at most {c['max_names']} names per story ({c['stories']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
