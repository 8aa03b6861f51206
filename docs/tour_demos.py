"""Small demonstrations for docs/TOUR.md, each a few seconds on a CPU: python docs/tour_demos.py NAME [options].

    attention                 RMSNorm by its formula; RoPE scores depend on distance only; the KV cache GQA saves
    router                    Mixtral's routing = a softmax over the top-k logits; what the two router losses measure
    experts --model M [M...] --data D
                              each trained model's expert load on val text, and its two router losses
    capacity --model M [M...] --data D
                              what an expert capacity would drop on val text; the grouped matmul against a loop
    rolling --tokens N        process memory while generating N tokens, with a rolling buffer and without one
    hf --model M              the same logits from transformers' MixtralForCausalLM on our checkpoint

They use the library's own functions (tinymixtral.*); nothing here is a second implementation.
"""

from __future__ import annotations

import argparse
import sys

import torch


def attention(args):
    from tinymixtral.config import ModelConfig
    from tinymixtral.model.norm import RMSNorm
    from tinymixtral.model.rope import apply_rope, rope_cos_sin
    from tinymixtral.params import report

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    norm = RMSNorm(8)
    by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    print(f"RMSNorm: max |ours - x / sqrt(mean(x^2) + eps)| = {(norm(x) - by_hand).abs().max():.1e}")

    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    print("RoPE: the score q.k after rotating q to position m and k to position n (theta = 1e6, head_dim 64)")
    for m, n in ((5, 3), (105, 103), (1005, 1003), (5, 4)):
        cq, sq = rope_cos_sin(torch.tensor([m]), 64, 1e6, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([n]), 64, 1e6, torch.float32)
        score = (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
        print(f"  m = {m:>4}, n = {n:>4}, m - n = {m - n}: {score:+.5f}")

    cfg = ModelConfig.from_name("mixtral-8x7b")
    print(f"KV cache of Mixtral 8x7B, bf16, context {cfg.max_seq_len:,}, batch 1 ({cfg.n_heads} query heads):")
    for g in (cfg.n_heads, cfg.n_kv_heads, 1):
        kv = report(cfg.replace(n_kv_heads=g), cfg.max_seq_len)["kv_cache_bytes"]["full"]["bf16"]
        label = "multi-head" if g == cfg.n_heads else ("multi-query" if g == 1 else "grouped (Mixtral)")
        print(f"  {g:>2} key/value heads ({label:<17}): {kv / 1e9:6.2f} GB")


def router(args):
    from tinymixtral.config import ModelConfig
    from tinymixtral.model.moe import Router, load_balancing_loss, router_z_loss

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16, n_experts=8, top_k=2)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.3)
    x = torch.randn(1000, 32)
    with torch.no_grad():
        logits, weights, experts = r(x)
    top_logits = logits.gather(1, experts)
    print("one token's router logits: " + " ".join(f"{v:+.2f}" for v in logits[0].tolist()))
    print(f"  experts chosen {experts[0].tolist()}, weights {[round(w, 4) for w in weights[0].tolist()]}")
    diff = (weights - top_logits.softmax(-1)).abs().max()
    print(f"softmax over all 8, keep the top 2, renormalise  vs  softmax over the top-2 logits: "
          f"max difference over 1,000 tokens {diff:.1e}")

    E, K, N = 8, 2, 4096
    print(f"the two router losses on {N:,} tokens, {E} experts, top-{K}:")
    cases = {
        "random router (balanced)": torch.randn(N, E),
        "the same logits x 10": 10 * torch.randn(N, E),
        "collapsed (experts 0, 1 win)": torch.randn(N, E) + torch.tensor([6.0, 6.0] + [0.0] * 6),
    }
    for name, lg in cases.items():
        load = torch.bincount(lg.topk(K, -1).indices.flatten(), minlength=E) / (N * K)
        print(f"  {name:<29} load-balancing {load_balancing_loss([lg], K):5.2f}   z-loss {router_z_loss([lg]):7.2f}"
              f"   largest expert load {load.max():.2f}")


def _routed(args):
    """(path, model, per-layer (logits_NE, experts_NK)) of each --model on the first --max-tokens val tokens."""
    from tinymixtral.analysis.stats import collect_routing
    from tinymixtral.checkpoint import load_model
    from tinymixtral.data import load_split

    val, _ = load_split(args.data, "val")
    ids = torch.from_numpy(val[:args.max_tokens].astype("int64"))
    print(f"{len(ids):,} val tokens")
    for path in args.model:
        model = load_model(path).eval()
        yield path.rstrip("/")[-22:], model, collect_routing(model, list(ids.split(256)))


def experts(args):
    from tinymixtral.model.moe import load_balancing_loss, router_z_loss

    rows = []
    for name, model, routing in _routed(args):
        for layer, (logits_NE, experts_NK) in enumerate(routing):
            load = torch.bincount(experts_NK.flatten(), minlength=model.cfg.n_experts) / experts_NK.numel()
            rows.append(f"{name:<22}{layer:>6}{load.max():>10.3f}{load.min():>10.3f}"
                        f"{load_balancing_loss([logits_NE], model.cfg.top_k):>14.3f}{router_z_loss([logits_NE]):>8.2f}")
    print(f"{'model':<22}{'layer':>6}{'max load':>10}{'min load':>10}{'balance loss':>14}{'z-loss':>8}")
    print("\n".join(rows))


def capacity(args):
    from tinymixtral.config import capacity
    from tinymixtral.model import fast
    from tinymixtral.model.moe import dispatch

    factors, rows = (1.0, 1.25, 2.0), []
    for name, model, routing in _routed(args):
        cfg = model.cfg
        for layer, (_, experts_NK) in enumerate(routing):
            N = experts_NK.shape[0]
            dropped = [dispatch(experts_NK, cfg.n_experts, capacity(N, cfg.replace(capacity_factor=f)))[2]
                       for f in factors]
            rows.append(f"{name:<22}{layer:>6}" + "".join(f"{d / experts_NK.numel():>13.1%}" for d in dropped))
    print("share of the assignments an expert capacity of factor x N x K / E would drop:")
    print(f"{'model':<22}{'layer':>6}" + "".join(f"{'factor ' + str(f):>13}" for f in factors))
    print("\n".join(rows))
    # the grouped product against one product per expert, on the last layer's real grouping
    torch.manual_seed(0)
    order_M, counts_E, _ = dispatch(experts_NK, cfg.n_experts)
    x_MI = torch.randn(len(order_M), cfg.d_model)
    w_EIO = torch.randn(cfg.n_experts, cfg.d_model, 2 * cfg.d_ff)
    grouped = fast.grouped_mm(x_MI, w_EIO, counts_E.cumsum(0).to(torch.int32), counts_E)
    loop = torch.cat([x @ w_EIO[e] for e, x in enumerate(x_MI.split(counts_E.tolist()))])
    print(f"grouped matmul vs one matmul per expert (rows per expert {counts_E.tolist()}): "
          f"max difference {(grouped - loop).abs().max():.1e}")


def rolling(args):
    from tinymixtral.build import build_model
    from tinymixtral.config import ModelConfig
    from tinymixtral.generation import stream

    def rss_mb() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    base = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=64,
                n_experts=4, top_k=2, max_seq_len=args.tokens + 16)
    print(f"random model, batch {args.batch}; the KV cache holds {2 * 4 * 4 * 64 * 4 * args.batch / 1024:.0f} KB "
          f"per token (k and v, 4 layers, 4 heads of 64, fp32); VmRSS growth in MB")
    print(f"{'tokens generated':>17}" + "".join(f"{t:>9,}" for t in range(0, args.tokens + 1, args.every)))
    for window in (args.window, None):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**base, sliding_window=window)).eval()
        prompt = torch.randint(0, 256, (args.batch, 8))
        before, row = rss_mb(), [0.0]
        with torch.no_grad():
            for i, _ in enumerate(stream(model, prompt, max_new_tokens=args.tokens, temperature=1.0, seed=0), 1):
                if i % args.every == 0:
                    row.append(rss_mb() - before)
        label = f"window {window}" if window else "no window"
        print(f"{label:>17}" + "".join(f"{v:>9.1f}" for v in row))


def hf(args):
    import transformers
    from tinymixtral.checkpoint import load_model

    ours = load_model(args.model).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    print(f"transformers {transformers.__version__} loaded {args.model} as {type(theirs).__name__}")
    print(f"300 tokens (longer than the window of {ours.cfg.sliding_window}): max |logit difference| "
          f"{(a - b).abs().max():.1e}, same next-token choice at {(a.argmax(-1) == b.argmax(-1)).float().mean():.0%} "
          "of positions")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="demo", required=True)
    sub.add_parser("attention")
    sub.add_parser("router")
    for name in ("experts", "capacity"):
        e = sub.add_parser(name)
        e.add_argument("--model", nargs="+", required=True)
        e.add_argument("--data", required=True)
        e.add_argument("--max-tokens", type=int, default=4096)
    r = sub.add_parser("rolling")
    r.add_argument("--tokens", type=int, default=2000)
    r.add_argument("--every", type=int, default=250)
    r.add_argument("--window", type=int, default=64)
    r.add_argument("--batch", type=int, default=4)
    h = sub.add_parser("hf")
    h.add_argument("--model", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    {"attention": attention, "router": router, "experts": experts, "capacity": capacity, "rolling": rolling,
     "hf": hf}[args.demo](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
