"""Routing statistics: pure functions of what the routers chose, plus one function that runs a model to get them.

Shapes: N tokens (all sequences, flattened in order), E experts, K experts per token (best first),
L MoE layers, U distinct expert sets.

"Consecutive" always means two neighbouring positions of the same sequence (the Mixtral paper, sec. 5:
the same expert is picked for consecutive tokens more often than chance). Chance is what tokens drawn
independently from the observed routing distribution would give:
- first choice: Σ_e p_e², p_e = share of tokens whose first choice is e;
- top-k sets overlap (share >= 1 expert): exact under independent draws from the observed distribution of
  expert *sets*, 1 - Σ_{A,B disjoint} q_A q_B (computed, not estimated by shuffling);
- mean number of shared experts: Σ_e f_e², f_e = share of tokens that have e among their top-k.
"""

from __future__ import annotations

import math

import torch

from ..errors import TinyMixtralError


# ---- per-layer statistics (tensors in, numbers out) -----------------------------------------------
def expert_load(experts_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] share of all N*K token-expert assignments that went to each expert (sums to 1)."""
    counts_E = torch.bincount(experts_NK.reshape(-1), minlength=n_experts).double()
    return counts_E / counts_E.sum()


def choice_load(experts_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[K, E] share of tokens whose k-th choice is each expert (row 0: first choice; each row sums to 1)."""
    return torch.stack([torch.bincount(experts_NK[:, k], minlength=n_experts).double() / experts_NK.shape[0]
                        for k in range(experts_NK.shape[1])])


def router_entropy(logits_NE: torch.Tensor) -> float:
    """Mean entropy (nats) of the softmax over all experts; its maximum is log E (a uniform router)."""
    logp_NE = logits_NE.double().log_softmax(dim=-1)
    return float(-(logp_NE.exp() * logp_NE).sum(dim=-1).mean())


def imbalance(load_E: torch.Tensor) -> dict:
    """max/min load (None when an expert gets nothing) and coefficient of variation (std/mean, 0 = balanced)."""
    lo, hi = float(load_E.min()), float(load_E.max())
    mean = float(load_E.mean())
    return {"max_min": hi / lo if lo > 0 else None, "cv": float(load_E.std(unbiased=False)) / mean if mean else 0.0}


def co_selection(experts_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E, E] int64: tokens for which experts i and j are both among the top-k (i != j).

    Symmetric, zero diagonal; every token adds its K*(K-1) ordered pairs, so the total is N*K*(K-1).
    """
    sel_NE = _multi_hot(experts_NK, n_experts).double()
    co_EE = (sel_NE.T @ sel_NE).round().long()
    co_EE.fill_diagonal_(0)
    return co_EE


def pair_mask(seq_lens: list[int]) -> torch.Tensor:
    """[N-1] bool: True where tokens n and n+1 are neighbours in the same sequence."""
    n = sum(seq_lens)
    mask = torch.ones(max(n - 1, 0), dtype=torch.bool)
    ends = torch.tensor(seq_lens).cumsum(0)[:-1] - 1  # last token of every sequence but the final one
    mask[ends] = False
    return mask


def repeat_rates(experts_NK: torch.Tensor, n_experts: int, seq_lens: list[int]) -> dict:
    """How often consecutive tokens share their routing, next to what independent tokens would give.

    repeat_top1: same first choice; overlap_topk: top-k sets share at least one expert; shared_topk: mean
    number of experts they share. Each comes with its chance_* (module docstring). None without pairs.
    """
    pairs = pair_mask(seq_lens)
    first_N = experts_NK[:, 0]
    sel_NE = _multi_hot(experts_NK, n_experts)
    p_E = torch.bincount(first_N, minlength=n_experts).double() / len(first_N)
    f_E = sel_NE.double().mean(dim=0)
    out = {"pairs": int(pairs.sum()), "chance_top1": float((p_E ** 2).sum()),
           "chance_overlap_topk": topk_overlap_chance(experts_NK, n_experts),
           "chance_shared_topk": float((f_E ** 2).sum())}
    if not pairs.any():
        return {**out, "repeat_top1": None, "overlap_topk": None, "shared_topk": None}
    shared = (sel_NE[1:] & sel_NE[:-1]).sum(dim=-1)[pairs]
    out["repeat_top1"] = float((first_N[1:] == first_N[:-1])[pairs].double().mean())
    out["overlap_topk"] = float((shared > 0).double().mean())
    out["shared_topk"] = float(shared.double().mean())
    return out


def topk_overlap_chance(experts_NK: torch.Tensor, n_experts: int, chunk: int = 2048) -> float:
    """P(two tokens drawn independently from the observed set distribution share an expert), exactly."""
    sets_UE, counts_U = torch.unique(_multi_hot(experts_NK, n_experts), dim=0, return_counts=True)
    q_U = counts_U.double() / counts_U.sum()
    sets_UE = sets_UE.double()
    disjoint = 0.0
    for i in range(0, len(q_U), chunk):  # U x U can be large: a block of rows at a time
        block_uU = (sets_UE[i:i + chunk] @ sets_UE.T) == 0
        disjoint += float(q_U[i:i + chunk] @ block_uU.double() @ q_U)
    return 1.0 - disjoint


def top_tokens(tokens_N: torch.Tensor, first_N: torch.Tensor, n_experts: int, n: int = 10) -> list[list[dict]]:
    """Per expert, its n most frequent tokens as first choice: id, count, and frac (share of that token's
    occurrences that went to this expert, 1.0 = the expert owns the token)."""
    total = torch.bincount(tokens_N)
    out = []
    for e in range(n_experts):
        counts = torch.bincount(tokens_N[first_N == e], minlength=len(total))
        ids = counts.nonzero().squeeze(1).tolist()
        ids.sort(key=lambda i: (-int(counts[i]), i))  # most frequent first; ties by id (deterministic)
        out.append([{"id": i, "count": int(counts[i]), "frac": int(counts[i]) / int(total[i])} for i in ids[:n]])
    return out


def layer_stats(logits_NE: torch.Tensor, experts_NK: torch.Tensor, tokens_N: torch.Tensor,
                seq_lens: list[int], top_n: int = 10) -> dict:
    """Every statistic of one layer, as plain numbers and lists (JSON-ready)."""
    E = logits_NE.shape[-1]
    load_E = expert_load(experts_NK, E)
    choice_KE = choice_load(experts_NK, E)
    return {
        "load": load_E.tolist(), "first_choice": choice_KE[0].tolist(),
        "second_choice": choice_KE[1].tolist() if len(choice_KE) > 1 else None,
        "entropy": router_entropy(logits_NE), **imbalance(load_E),
        **repeat_rates(experts_NK, E, seq_lens),
        "co_selection": co_selection(experts_NK, E).tolist(),
        "top_tokens": top_tokens(tokens_N, experts_NK[:, 0], E, top_n),
    }


def summarize(routing: list[tuple[torch.Tensor, torch.Tensor]], tokens_N: torch.Tensor, seq_lens: list[int],
              top_n: int = 10) -> dict:
    """Statistics of every layer from its (logits_NE, experts_NK); tokens_N are the ids in the same order."""
    assert routing, "no routing to summarize"
    E, K = routing[0][0].shape[-1], routing[0][1].shape[-1]
    assert all(len(ex) == len(tokens_N) == sum(seq_lens) for _, ex in routing), "tokens and routing disagree"
    return {"n_tokens": len(tokens_N), "n_sequences": len(seq_lens), "n_experts": E, "top_k": K,
            "max_entropy": math.log(E),
            "layers": [{"layer": i, **layer_stats(lg, ex, tokens_N, seq_lens, top_n)}
                       for i, (lg, ex) in enumerate(routing)]}


# ---- running a model ---------------------------------------------------------------------------------
@torch.no_grad()
def collect_routing(model, sequences: list[torch.Tensor], batch_size: int = 8) -> list[tuple]:
    """Per MoE layer, (logits_NE, experts_NK) for all tokens of `sequences` (1-D id tensors), in order.

    Reads model.routing() after each forward: the model's code is untouched. Sequences of equal length
    are batched together; each is run on its own positions from 0, as in training.
    """
    if not model.cfg.is_moe:
        raise TinyMixtralError("the model is dense (no router): routing statistics need a Mixtral (MoE) model")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    i = 0
    while i < len(sequences):  # batch runs of consecutive equal-length sequences: keeps the token order
        j = i
        while j < len(sequences) and j - i < batch_size and len(sequences[j]) == len(sequences[i]):
            j += 1
        x_BS = torch.stack([torch.as_tensor(s, dtype=torch.long) for s in sequences[i:j]]).to(device)
        model(x_BS, last_only=True)  # logits are not needed, only the routing
        parts.append([(r.logits_NE.float().cpu(), r.experts_NK.cpu()) for r in model.routing()])
        i = j
    model.train(was_training)
    return [(torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts]))
            for layer in range(len(parts[0]))]


def as_sequences(input_ids) -> list[torch.Tensor]:
    """[S] or [B, S] ids, or a list of 1-D id sequences -> a list of 1-D LongTensors."""
    if torch.is_tensor(input_ids):
        return list(input_ids.long()) if input_ids.dim() == 2 else [input_ids.long()]
    return [torch.as_tensor(s, dtype=torch.long) for s in input_ids]


def routing_stats(model, input_ids, top_n: int = 10, batch_size: int = 8) -> dict:
    """Routing statistics of a MoE model on some token ids ([S], [B, S] or a list of sequences).

    Returns {"n_tokens", "n_sequences", "n_experts", "top_k", "max_entropy", "layers": [per layer: load,
    first_choice, second_choice, entropy, max_min, cv, repeat_top1/chance_top1, overlap_topk/
    chance_overlap_topk, shared_topk/chance_shared_topk, pairs, co_selection, top_tokens]}.
    """
    seqs = as_sequences(input_ids)
    routing = collect_routing(model, seqs, batch_size)
    return summarize(routing, torch.cat(seqs), [len(s) for s in seqs], top_n)


def _multi_hot(experts_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[N, E] bool: expert e is among token n's top-k."""
    return torch.zeros(experts_NK.shape[0], n_experts, dtype=torch.bool).scatter_(1, experts_NK.long().cpu(), True)
