"""Shared test helpers and fixtures. Test modules import the helpers with `from conftest import ...` (pytest's
default import mode puts tests/ on sys.path); no test module imports another."""

from __future__ import annotations

import os

# Tests never touch the network: transformers and datasets must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tinymixtral.config import ModelConfig  # noqa: E402
from tinymixtral.model.moe import MoE  # noqa: E402
from tinymixtral.model.transformer import Transformer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny test models run fastest on one thread, and far faster when other work shares the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file

# Each row's expert, for the kernels that take one expert per row: rows of one expert apart (grouped by the kernel),
# runs of more than 4 rows of one expert (each read once for 4) with tails, all distinct (a decode step's top-k).
EXPERT_ROWS = [[3, 0, 3, 1, 2], [1, 1, 0, 1, 2, 1, 1, 0, 1, 1, 2, 0, 0], [2, 2, 2, 2, 2, 2], [3, 1]]


# ---- tiny models -----------------------------------------------------------------------------------
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4, top_k=2,
            max_seq_len=64)


def tiny_cfg(**overrides) -> ModelConfig:
    """A tiny fp32 Mixtral config: vocab 64, d_model 32, 2 layers, 4 heads / 2 kv heads, d_ff 64, 4 experts top-2,
    context 64 (other fields at ModelConfig's defaults, e.g. rope_theta 1e6, no sliding window); overrides win."""
    return ModelConfig(**{**TINY, **overrides})


@torch.no_grad()
def tiny_model(cfg: ModelConfig | dict | None = None, seed: int | None = 0, *, std: float | None = None,
               vary_norms: bool = False, **overrides) -> Transformer:
    """A random Transformer, in eval mode, of tiny_cfg(**overrides); or of `cfg` with `overrides` applied:
    a ModelConfig through cfg.replace (which keeps a resolved head_dim), a dict as more tiny_cfg overrides.

    seed: torch.manual_seed before building (None: draw from the current RNG state).
    std: redraw every weight but the norms from N(0, std), larger than the 0.02 init so every component matters.
    vary_norms: norm weights uniform in [0.5, 1.5], not all ones, so a dropped or misapplied norm shows.
    """
    cfg = cfg.replace(**overrides) if isinstance(cfg, ModelConfig) else tiny_cfg(**{**(cfg or {}), **overrides})
    if seed is not None:
        torch.manual_seed(seed)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if std is not None and not name.endswith("norm.weight"):
            p.normal_(0.0, std)
        if vary_norms and name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
    return model.eval()


# tiny_model / tiny_cfg overrides shared by several files:
GEN = dict(vocab_size=97, d_ff=48, max_seq_len=512)  # generation and cache: an odd vocab and a long context
DECODE = dict(vocab_size=96, d_ff=48, sliding_window=8)  # compiled and fast decode: a window of 8 slots that wraps


def seeded_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids [batch, seq] in [0, vocab) from their own generator (the global RNG is left alone)."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    """Same keys, dtypes and values, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---- the MoE layer and its plain reference (test_moe, test_fast) -------------------------------------
def moe_cfg(E=4, K=2, D=16, Fd=8, **kw) -> ModelConfig:
    """A one-layer config for MoE-layer tests: d_model D and d_ff Fd free (odd sizes too, head_dim pinned to 4)."""
    return tiny_cfg(vocab_size=32, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=Fd,
                    n_experts=E, top_k=K, **kw)


def make_moe(cfg: ModelConfig, seed=0, std=0.3) -> MoE:
    """An MoE layer of `cfg` with every weight from N(0, std), seeded."""
    torch.manual_seed(seed)
    m = MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, std)
    return m


def ref_routing(x_ND, router_w, top_k):
    """Mixtral routing, written out: softmax over all logits, top-k, renormalise."""
    logits = (x_ND @ router_w.T).float()
    probs = torch.softmax(logits, dim=-1)
    w_NK, idx_NK = torch.topk(probs, top_k, dim=-1)
    return logits, w_NK / w_NK.sum(dim=-1, keepdim=True), idx_NK


def ref_keep_mask(idx_NK, n_experts, cap):
    """First come, first served in flattened (token, slot) order: keep[n, k] for each assignment."""
    keep = torch.zeros(idx_NK.shape, dtype=torch.bool)
    used = [0] * n_experts
    for n in range(idx_NK.shape[0]):
        for k in range(idx_NK.shape[1]):
            e = int(idx_NK[n, k])
            if cap is None or used[e] < cap:
                keep[n, k] = True
                used[e] += 1
    return keep


def ref_moe(x_BSD, router_w, w13, w2, top_k, cap=None, routing=None):
    """litgpt / HF style MoE: a Python loop over experts with boolean masks.

    routing: optionally (weights_NK, idx_NK) to use instead of computing them (for noisy routers).
    Returns (y_BSD, keep_NK).
    """
    D = x_BSD.shape[-1]
    x = x_BSD.reshape(-1, D)
    if routing is None:
        _, w_NK, idx_NK = ref_routing(x, router_w, top_k)
    else:
        w_NK, idx_NK = routing
    E, two_f, _ = w13.shape
    Fd = two_f // 2
    keep = ref_keep_mask(idx_NK, E, cap)
    y = torch.zeros_like(x)
    for e in range(E):
        mask_NK = (idx_NK == e) & keep
        tok, slot = torch.where(mask_NK)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        w1_e, w3_e = w13[e, :Fd], w13[e, Fd:]
        h = F.silu(xe @ w1_e.T) * (xe @ w3_e.T)
        out = (h @ w2[e].T) * w_NK[tok, slot, None].to(x.dtype)
        y = y.index_add(0, tok, out)
    return y.view_as(x_BSD), keep


def no_loop(*a, **k):
    """Monkeypatched over a slow path that must not run."""
    raise AssertionError("grouped_mm_loop used where torch grouped_mm should have run")


# ---- the command line ------------------------------------------------------------------------------
def run_cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """`python -m tinymixtral ARGS` in a subprocess (one OpenMP thread), with text stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tinymixtral", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def call_cli(capsys, *args) -> subprocess.CompletedProcess:
    """`tinymixtral ARGS` in this process (cli.main): its exit status and captured output, as run_cli gives them."""
    from tinymixtral import cli

    argv = list(map(str, args))
    code = cli.main(argv)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def assert_one_line_error(proc, command: str, returncode: int | None = None) -> str:
    """`proc` failed (with `returncode`, when given) and printed exactly one stderr line
    `tinymixtral <command>: error: ...` and no traceback; returns that line."""
    if returncode is None:
        assert proc.returncode != 0, proc.stderr
    else:
        assert proc.returncode == returncode, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"tinymixtral {command}: error: "), lines[0]
    return lines[0]


# ---- model directories (test_checkpoint, test_convert, test_params, test_parity) -------------------------
SAVED_CFG = tiny_cfg(vocab_size=67, d_ff=40, sliding_window=8, rope_theta=1e4, router_aux_loss_coef=0.02)


@pytest.fixture
def saved(tmp_path):
    """A saved MoE model directory (SAVED_CFG, norms not all ones) and its model."""
    from tinymixtral import save_model

    model = tiny_model(SAVED_CFG, vary_norms=True)
    save_model(model, tmp_path / "m")
    return tmp_path / "m", model


def safetensors_keys(directory) -> dict[str, str]:
    """key -> file, over every safetensors file in the directory (no key in two files)."""
    where = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), framework="pt") as st:
                for k in st.keys():
                    assert k not in where, f"{k} in two files"
                    where[k] = f
    return where


def rewrite_weights(directory, edit):
    """Load model.safetensors (copied out of the mmap), let `edit` change the dict, write it back."""
    path = os.path.join(directory, "model.safetensors")
    sd = {k: v.clone() for k, v in load_file(path).items()}
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_config(directory, edit):
    """Let `edit` change the directory's config.json dict, write it back."""
    path = os.path.join(directory, "config.json")
    d = json.load(open(path))
    edit(d)
    json.dump(d, open(path, "w"))


def classic_keys(cfg: ModelConfig) -> set[str]:
    """The keys of a classic Mixtral/Mistral checkpoint on the Hub, written out by hand."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if cfg.tie_embeddings else {"lm_head.weight"})
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        keys |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        if cfg.is_moe:
            keys.add(p + "block_sparse_moe.gate.weight")
            keys |= {p + f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(cfg.n_experts) for w in ("w1", "w2", "w3")}
        else:
            keys |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return keys


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights at a scale where activations are O(1): norms around 1 (not all ones), routers decisive."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():  # a tied head is visited once, as the embedding
        if name.endswith("norm.weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif "embed" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:  # [out, in] or stacked experts [E, out, in]; routers [E, D]
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return module


_SWA = tiny_cfg(vocab_size=101, d_ff=48, sliding_window=8, rope_theta=1e4, router_aux_loss_coef=0.02)
_MISTRAL = tiny_cfg(vocab_size=89, n_experts=0, rope_theta=1e4)
# name -> (config, attention implementation of the HF model, batch, sequence length): test_parity, test_convert
PARITY_CASES = {
    # Sliding window 8 over 30 tokens: most keys fall outside the window of late queries.
    "mixtral-swa-eager": (_SWA, "eager", 2, 30),
    "mixtral-swa-sdpa": (_SWA, "sdpa", 2, 30),
    # One kv head, top-3 of 5, tied embeddings, head_dim 16 != 48 / 4, no window, batch 3.
    "mixtral-kv1-top3-tied-hd16": (
        tiny_cfg(vocab_size=97, d_model=48, n_kv_heads=1, head_dim=16, d_ff=40, n_experts=5, top_k=3,
                 sliding_window=None, norm_eps=1e-6, tie_embeddings=True, rope_theta=1e6, router_aux_loss_coef=0.01),
        "eager", 3, 13,
    ),
    "mistral-swa": (_MISTRAL.replace(sliding_window=6), "sdpa", 2, 22),
    "mistral-full": (_MISTRAL.replace(sliding_window=None), "eager", 2, 17),
}


# ---- a short training run (test_train, test_evaluate, test_plots) --------------------------------------
TRAIN_CFG = tiny_cfg(vocab_size=320, rope_theta=1e4, router_aux_loss_coef=0.01)


def _run_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names, verbs = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"], ["ran to", "looked at", "played with", "found"]
    things = ["the red ball", "a big tree", "the small dog", "a blue box", "the happy cat", "the park"]
    return [" ".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}." for _ in range(rng.randint(2, 5)))
            for _ in range(n)]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """1,500 short template stories prepared with a 300-token BPE, 5% for val."""
    from tinymixtral.data import prepare

    root = tmp_path_factory.mktemp("train-data")
    src = root / "corpus.txt"
    src.write_text("\n<|endoftext|>\n".join(_run_docs(1500)))
    prepare(str(src), root / "data", "bpe:300", val_fraction=0.05, seed=0)
    return root / "data"


def tcfg_for(data_dir, out, **kw):
    """The TrainConfig of the short runs: batch 8 x 32 tokens, 20 steps, eval and checkpoint every 10."""
    from tinymixtral.train import TrainConfig

    base = dict(data=str(data_dir), out=str(out), batch_size=8, seq_len=32, lr=1e-2, warmup_steps=3,
                max_steps=20, eval_interval=10, eval_batches=4, log_interval=1, ckpt_interval=10, keep_last=2,
                seed=7, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
    """A 40-step run of TRAIN_CFG on data_dir: (run dir, its TrainConfig, train()'s final metrics)."""
    from tinymixtral.train import train

    out = tmp_path_factory.mktemp("run") / "run"
    tcfg = tcfg_for(data_dir, out, max_steps=40, keep_last=2)
    final = train(tcfg, TRAIN_CFG)
    return out, tcfg, final


# ---- prepared text (test_data, test_train) ---------------------------------------------------------------
NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Zoe"]
VERBS = ["ran to", "looked at", "played with", "found", "liked", "saw", "hugged", "painted"]
THINGS = ["the red ball", "a big tree", "the small dog", "a blue box", "the happy cat", "the park",
          "a shiny star", "the old boat"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Short seeded template stories; some start with 'Once upon a time', one has non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}." for _ in range(rng.randint(2, 4))]
        if i % 3 == 0:
            sents.insert(0, "Once upon a time,")
        if i % 50 == 7:
            sents.append("Café, naïve, 日本 🙂.")
        docs.append(" ".join(sents) + (f" The end {i}." if i % 2 else ""))
    return docs


def write_txt(path: Path, docs: list[str]) -> Path:
    """A .txt source: the documents joined by the TinyStories separator."""
    from tinymixtral.data import DOC_SEPARATOR

    path.write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n", encoding="utf-8")
    return path


# ---- dense models and two kinds of text (test_upcycle, test_merge) ---------------------------------------
DENSE = dict(vocab_size=512, d_model=64, d_ff=128, n_experts=0, rope_theta=1e4)  # tiny_cfg overrides
DENSE_CFG = tiny_cfg(**DENSE)


def animals(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    adj, ani = ["small", "big", "brown", "happy", "old", "little", "soft", "lazy"], ["cat", "dog", "bird", "horse",
                                                                                     "cow", "fox", "duck", "sheep"]
    verb, place = ["sat on", "ran to", "looked at", "slept by", "jumped over", "walked to"], ["the mat", "the barn",
                                                                                           "the tree", "the river",
                                                                                           "the farm", "the hill"]
    return [" ".join(f"the {r.choice(adj)} {r.choice(ani)} {r.choice(verb)} {r.choice(place)}."
                     for _ in range(r.randint(2, 4))) for _ in range(n)]


def arithmetic(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        sums = []
        for _ in range(r.randint(2, 4)):
            a, b, op = r.randint(0, 50), r.randint(0, 50), r.choice("+-*")
            sums.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}.")
        docs.append(" ".join(sums))
    return docs


@pytest.fixture(scope="session")
def tok300():
    """A 300-token BPE of both kinds of text."""
    from tinymixtral.tokenizer import train_bpe

    return train_bpe(animals(50, 0) + arithmetic(50, 0), 300)


def tiny_dense_dir(path, seed=0, tok=None, **over):
    """A saved random dense model (DENSE with vocab 300, then `over`): (its directory, the model)."""
    from tinymixtral import save_model

    model = tiny_model(DENSE, seed, **{"vocab_size": 300, **over})
    return save_model(model, path, tokenizer=tok), model


# Mistral's own SentencePiece files as mistral-common ships them (no download): v1 is Mixtral-8x7B-Instruct's
# ([INST] as text), v2 and v3 have [INST] / [/INST] control tokens (v3: Mistral-7B-Instruct-v0.3, Mixtral-8x22B),
# v7 also [SYSTEM_PROMPT].
MISTRAL_TOKENIZERS = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
                      "v3": "mistral_instruct_tokenizer_240323.model.v3",
                      "v7": "mistral_instruct_tokenizer_241114.model.v7"}


def mistral_tokenizer_file(version: str) -> Path:
    """The path of mistral-common's SentencePiece file of that version ("v1", "v2", "v3", "v7")."""
    import importlib.resources

    return Path(str(importlib.resources.files("mistral_common") / "data" / MISTRAL_TOKENIZERS[version]))
