"""Routing statistics on hand-made routings with known answers, routing_stats on a tiny model, `tinymixtral routes`."""
import json
import math
import random

import numpy as np
import pytest
import torch

import tinymixtral
from conftest import PNG, assert_one_line_error, call_cli, tiny_model
from tinymixtral import cli
from tinymixtral.analysis import stats as S
from tinymixtral.checkpoint import save_model
from tinymixtral.tokenizer import train_bpe

TINY = dict(vocab_size=300, rope_theta=1e4)  # tiny_cfg overrides


def random_topk(n: int, e: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, k] distinct experts per token, uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])


# ---- pure statistics on hand-made routings -----------------------------------------------------------
def test_always_the_same_expert_repeats_every_time():
    experts = torch.tensor([[2, 0]] * 50)
    r = S.repeat_rates(experts, 4, [50])
    assert r["pairs"] == 49
    assert r["repeat_top1"] == 1.0 and r["chance_top1"] == 1.0  # one expert takes every first choice
    assert r["overlap_topk"] == 1.0 and r["shared_topk"] == 2.0


def test_alternating_experts_never_repeat_but_chance_is_half():
    experts = torch.tensor([[0], [1]] * 20)
    r = S.repeat_rates(experts, 2, [40])
    assert r["repeat_top1"] == 0.0 and r["chance_top1"] == pytest.approx(0.5)
    assert r["overlap_topk"] == 0.0 and r["chance_overlap_topk"] == pytest.approx(0.5)  # K=1: same as top-1
    assert r["chance_shared_topk"] == pytest.approx(0.5)


def test_sequence_boundaries_are_not_pairs():
    assert S.pair_mask([3, 2]).tolist() == [True, True, False, True]
    assert S.pair_mask([4]).tolist() == [True] * 3
    experts = torch.tensor([[0]] * 5 + [[1]] * 5)  # two sequences, each constant, different experts
    r = S.repeat_rates(experts, 2, [5, 5])
    assert r["pairs"] == 8 and r["repeat_top1"] == 1.0
    assert S.repeat_rates(torch.tensor([[0], [1]]), 2, [1, 1])["repeat_top1"] is None  # no pairs at all


def test_uniform_random_choices_repeat_at_chance():
    E, K, N = 4, 2, 20000
    r = S.repeat_rates(random_topk(N, E, K), E, [N // 100] * 100)
    # Exact values for uniform choices: 1/E; 1 - P(disjoint) = 1 - 1/6 (one disjoint pair among 6); K*K/E.
    assert r["chance_top1"] == pytest.approx(1 / E, abs=0.01)
    assert r["chance_overlap_topk"] == pytest.approx(5 / 6, abs=0.01)
    assert r["chance_shared_topk"] == pytest.approx(K * K / E, abs=0.02)
    assert r["repeat_top1"] == pytest.approx(r["chance_top1"], abs=0.015)
    assert r["overlap_topk"] == pytest.approx(r["chance_overlap_topk"], abs=0.015)
    assert r["shared_topk"] == pytest.approx(r["chance_shared_topk"], abs=0.03)


def test_overlap_chance_is_exact_for_a_known_set_distribution():
    # Sets {0,1} (half the tokens) and {2,3} (half): two independent tokens overlap iff same set -> 0.5.
    experts = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]])
    assert S.topk_overlap_chance(experts, 4) == pytest.approx(0.5)
    assert S.topk_overlap_chance(experts, 4, chunk=1) == pytest.approx(0.5)  # chunking changes nothing


def test_loads_entropy_imbalance():
    experts = random_topk(1000, 8, 2, seed=1)
    load = S.expert_load(experts, 8)
    assert load.sum().item() == pytest.approx(1.0) and load.shape == (8,)
    choice = S.choice_load(experts, 8)
    assert choice.shape == (2, 8) and choice.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert torch.allclose(choice.mean(dim=0), load)
    assert S.expert_load(torch.tensor([[0, 1], [0, 2]]), 4).tolist() == [0.5, 0.25, 0.25, 0.0]
    assert S.router_entropy(torch.zeros(10, 8)) == pytest.approx(math.log(8))
    assert S.router_entropy(torch.tensor([[100.0, 0, 0, 0]])) == pytest.approx(0.0, abs=1e-6)
    imb = S.imbalance(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert imb["max_min"] == pytest.approx(4.0) and imb["cv"] == pytest.approx(np.std([1, 2, 3, 4]) / 2.5)
    assert S.imbalance(torch.tensor([0.5, 0.5, 0.0]))["max_min"] is None
    assert S.imbalance(torch.full((4,), 0.25)) == {"max_min": 1.0, "cv": 0.0}


def test_co_selection_symmetric_zero_diagonal_and_total():
    N, E, K = 500, 6, 3
    co = S.co_selection(random_topk(N, E, K, seed=2), E)
    assert co.shape == (E, E) and torch.equal(co, co.T) and co.diagonal().eq(0).all()
    assert co.sum().item() == N * K * (K - 1)  # K*(K-1) ordered pairs per token
    assert S.co_selection(torch.tensor([[0, 2], [2, 0], [1, 2]]), 3).tolist() == [[0, 0, 2], [0, 0, 1], [2, 1, 0]]


def test_top_tokens_per_expert():
    tokens = torch.tensor([5, 5, 5, 7, 7, 9])
    first = torch.tensor([0, 0, 1, 0, 0, 1])
    top = S.top_tokens(tokens, first, 3, n=2)
    assert top[0] == [{"id": 5, "count": 2, "frac": pytest.approx(2 / 3)}, {"id": 7, "count": 2, "frac": 1.0}]
    assert {t["id"] for t in top[1]} == {5, 9} and top[2] == []


# ---- routing_stats on a model ------------------------------------------------------------------------
def test_routing_stats_on_a_tiny_model():
    model = tiny_model(TINY).train()
    x = torch.randint(0, 300, (3, 20))
    out = tinymixtral.routing_stats(model, x)
    assert model.training  # left as it was
    assert (out["n_tokens"], out["n_sequences"], out["n_experts"], out["top_k"]) == (60, 3, 4, 2)
    assert len(out["layers"]) == 2 and out["max_entropy"] == pytest.approx(math.log(4))
    model.eval()
    with torch.no_grad():
        model(x)
    for lay, r in zip(out["layers"], model.routing()):  # the same routing a plain forward gives
        first = torch.bincount(r.experts_NK[:, 0], minlength=4) / 60
        assert lay["first_choice"] == pytest.approx(first.tolist())
        assert sum(lay["load"]) == pytest.approx(1.0) and sum(lay["second_choice"]) == pytest.approx(1.0)
        assert sum(map(sum, lay["co_selection"])) == 60 * 2 and lay["pairs"] == 3 * 19
        assert 0 <= lay["entropy"] <= math.log(4) and 0 <= lay["repeat_top1"] <= 1
    json.dumps(out)  # plain numbers only
    # ragged sequences and a 1-D input work too
    assert tinymixtral.routing_stats(model, [x[0, :7], x[1]])["n_tokens"] == 27
    assert tinymixtral.routing_stats(model, x[0])["n_sequences"] == 1


# ---- the command -------------------------------------------------------------------------------------
TEXT = ("Tom ran to the park. Lily looked at the red ball. 12 + 7 = 19. The happy cat sat on a mat. " * 3).strip()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    rng = random.Random(0)
    words = TEXT.split()
    tok = train_bpe([" ".join(rng.sample(words, len(words))) for _ in range(50)], 300)
    save_model(tiny_model(TINY), root / "moe", tokenizer=tok)
    save_model(tiny_model(TINY, seed=None, n_experts=0), root / "dense", tokenizer=tok)
    (root / "text.txt").write_text(TEXT)
    return root


def test_routes_cli_writes_table_json_pictures_and_html(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["routes", "--model", str(model_dir / "moe"), "--text", str(model_dir / "text.txt"),
                     "--out", str(out), "--layer", "1", "--seq-len", "40"]) == 0
    printed = capsys.readouterr().out
    assert "repeat" in printed and "chance" in printed and "co-selection at layer 1" in printed
    assert {p.name for p in out.iterdir()} == {"routes.json", "routes.txt", "load_heatmap.png", "repeat_rate.png",
                                               "routes_layer1.html"}
    stats = json.loads((out / "routes.json").read_text())
    n = stats["n_tokens"]
    assert stats["n_sequences"] == math.ceil(n / 40) and len(stats["layers"]) == 2
    assert (out / "routes.txt").read_text() in printed
    for name in ("load_heatmap.png", "repeat_rate.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    page = (out / "routes_layer1.html").read_text()
    assert page.count('<span class="tok e') == n  # one span per token
    assert all(f'class="key e{e}"' in page for e in range(4))  # the legend
    assert "&lt;s&gt;" in page  # BOS shown, escaped
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    tops = stats["layers"][1]["top_tokens"]
    assert all("text" in t for toks in tops for t in toks)
    assert cli.main(["routes", "--model", str(model_dir / "moe"), "--text", str(model_dir / "text.txt"), "--json",
                     "--seq-len", "40"]) == 0
    assert json.loads(capsys.readouterr().out) == stats  # --json prints what routes.json holds


def test_routes_cli_on_a_data_dir(model_dir, tmp_path, capsys):
    from tinymixtral.data import write_tokens
    from tinymixtral.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir / "moe")
    data = tmp_path / "data"
    data.mkdir()
    counts = write_tokens([TEXT] * 4, tok, data / "val.bin", np.uint16, desc="val")
    (data / "meta.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "dtype": "uint16"}))
    assert cli.main(["routes", "--model", str(model_dir / "moe"), "--data", str(data), "--max-tokens", "100",
                     "--seq-len", "32", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_tokens"] == min(100, counts["tokens"]) and stats["n_sequences"] == 4


@pytest.mark.parametrize("args, message", [
    (["--text", "MISSING.txt"], "text file not found"),
    (["--text", "text.txt", "--layer", "5"], "--layer 5 is out of range"),
    (["--text", "text.txt", "--max-tokens", "0"], "--max-tokens must be >= 1"),
])
def test_routes_cli_errors_are_one_line(model_dir, capsys, args, message):
    args = [str(model_dir / a) if a.endswith(".txt") else a for a in args]
    r = call_cli(capsys, "routes", "--model", model_dir / "moe", *args)
    assert message in assert_one_line_error(r, "routes", 2)


def test_routes_cli_refuses_a_dense_model(model_dir, capsys):
    assert cli.main(["routes", "--model", str(model_dir / "dense"), "--text", str(model_dir / "text.txt")]) == 2
    assert "dense model" in capsys.readouterr().err
