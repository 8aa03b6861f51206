"""benchmarks/demo_names.py: the name counter on hand-written stories and on the corpus, and its sampling plumbing."""
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import TRAIN_CFG, call_cli, tiny_model

spec = importlib.util.spec_from_file_location("demo_names", Path(__file__).parents[1] / "benchmarks" / "demo_names.py")
dn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dn)


@pytest.mark.parametrize("text,names", [
    ("Once upon a time, there was a little girl named Lily. Lily had a dog called Spot. Spot and Lily played.",
     ["Lily", "Spot"]),
    ("Tim and Timmy met Tom's friend Sue. \"Hi, Sue!\" said Tim.", ["Tim", "Timmy", "Tom", "Sue"]),  # whole words
    ("The fluffy cat purred. Mom said hi to Dad. Rosie saw a rose.", ["Rosie"]),  # lower case, parents: no names
    ("Maxwell, Sammy and Kimberly are not in the lists.", []),
    ("Once upon a time, there lived a kind boy named Ben. One day, Mia gave Max a ball. Eli, Zoe and Bella "
     "laughed. Ben smiled.", ["Ben", "Mia", "Max", "Eli", "Zoe", "Bella"]),
])
def test_story_names_counts_distinct_character_names(text, names):
    assert dn.story_names(text) == names


def test_summary_counts_the_stories_that_keep_to_two_names():
    s = dn.summary([1, 2, 3, 7, 2])
    assert s == {"distribution": {"1": 1, "2": 2, "3": 1, "7": 1}, "mean_names": 3.0, "max_names": 7,
                 "at_most_2": 3, "stories": 5}


def test_the_corpus_itself_names_at_most_two_characters_per_story():
    c = dn.corpus_reference(400)
    assert c["max_names"] == 2 and c["at_most_2"] == 400 and 1.25 < c["mean_names"] < 1.55  # the 1.4


def test_samples_are_what_generate_prints(tmp_path, data_dir, capsys):
    from tinymixtral import save_model
    from tinymixtral.tokenizer import load_tokenizer

    tok = load_tokenizer(data_dir / "tokenizer")
    model_dir = save_model(tiny_model(TRAIN_CFG.replace(vocab_size=tok.vocab_size)), tmp_path / "m", tokenizer=tok)
    out = tmp_path / "names.json"
    assert dn.main(["--model", str(model_dir), "--seeds", "2", "--max-new-tokens", "12", "--corpus", "0",
                    "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [s["seed"] for s in r["samples"]] == [0, 1] and r["stories"] == 2
    assert r["settings"] == {"prompt": "Once upon a time", "temperature": 0.7, "top_k": 40, "max_new_tokens": 12}
    assert all(s["n_names"] == len(s["names"]) == len(dn.story_names(s["text"])) for s in r["samples"])
    capsys.readouterr()
    gen = call_cli(capsys, "generate", "--model", model_dir, "--temperature", "0.7", "--top-k", "40",
                   "--max-new-tokens", "12", "--seed", "1")
    assert gen.returncode == 0 and gen.stdout.rstrip("\n") == r["samples"][1]["text"]
    assert dn.main(["--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo_names: error: ")
