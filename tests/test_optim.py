"""Muon (with AdamW for the rest) against torch's own optimizers and a per-matrix reference; which
parameters each gets; the wsd schedule; a short Muon run learns."""
import dataclasses

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from conftest import TRAIN_CFG, tcfg_for, tiny_model
from tinymixtral.optim import Muon, newton_schulz, split_params
from tinymixtral.run_state import read_metrics
from tinymixtral.train import TrainConfig, get_lr, train


def _run(params_groups, grads, steps=3, **kw):
    """`steps` Muon steps, step s with the gradients grads[id(param)][s]; returns the optimizer."""
    opt = Muon(params_groups, **kw)
    for s in range(steps):
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = grads[id(p)][s].clone()
        opt.step()
    return opt


def test_newton_schulz_matches_torch_and_orthogonalises():
    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(G, dtype=torch.bfloat16)
    ref = _zeropower_via_newtonschulz(G, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
    assert torch.equal(ours, ref)  # the same bf16 products as torch's
    s = torch.linalg.svdvals(newton_schulz(G, dtype=torch.float32))
    assert 0.5 < s.min() and s.max() < 1.3  # every singular value pulled near 1 (roughly: 5 quintic steps)
    tall = newton_schulz(G.T.contiguous(), dtype=torch.float32)  # m > n is transposed and back
    torch.testing.assert_close(tall, newton_schulz(G, dtype=torch.float32).T, rtol=0, atol=1e-5)


def test_muon_step_equals_torch_muon_on_a_matrix():
    gen = torch.Generator().manual_seed(1)
    w0, grads = torch.randn(32, 64, generator=gen), torch.randn(3, 32, 64, generator=gen)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95)
    for s in range(3):
        ref.grad = grads[s].clone()
        opt.step()
    ours = torch.nn.Parameter(w0.clone())
    _run([{"params": [ours], "use_muon": True, "lr": 0.02, "weight_decay": 0.1}], {id(ours): grads},
         ns_dtype="bfloat16")
    assert torch.equal(ours.detach(), ref.detach())


def test_expert_stacks_and_fused_matrices_update_matrix_by_matrix():
    gen = torch.Generator().manual_seed(2)
    stack, grads = torch.randn(4, 24, 16, generator=gen), torch.randn(3, 4, 24, 16, generator=gen)
    whole = torch.nn.Parameter(stack.clone())
    whole.muon_splits = [10, 14]  # e.g. w1 and w3 of unequal height: each its own matrix
    _run([{"params": [whole], "use_muon": True, "lr": 0.05, "weight_decay": 0.01}], {id(whole): grads},
         ns_dtype="float32")
    for e in range(4):
        for rows in (slice(0, 10), slice(10, 24)):
            alone = torch.nn.Parameter(stack[e, rows].clone())
            _run([{"params": [alone], "use_muon": True, "lr": 0.05, "weight_decay": 0.01}],
                 {id(alone): grads[:, e, rows]}, ns_dtype="float32")
            torch.testing.assert_close(whole.detach()[e, rows], alone.detach(), rtol=0, atol=1e-6)


def test_adamw_groups_equal_torch_adamw():
    gen = torch.Generator().manual_seed(3)
    w0, grads = torch.randn(8, 6, generator=gen), torch.randn(5, 8, 6, generator=gen)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for s in range(5):
        ref.grad = grads[s].clone()
        opt.step()
    ours = torch.nn.Parameter(w0.clone())
    _run([{"params": [ours], "lr": 0.01, "weight_decay": 0.1}], {id(ours): grads}, steps=5, betas=(0.9, 0.95))
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-6)


def test_split_params_gives_muon_the_hidden_matrices_only():
    for model in (tiny_model(), tiny_model(n_experts=0)):
        hidden, rest = split_params(model)
        names = {n for n, _ in hidden}
        assert all(n.split(".")[-2:][-1] in ("w13", "w2") or n.split(".")[-2] in ("wqkv", "wo", "w13", "w2")
                   for n in names)
        assert {n.split(".")[-2] for n in names if n.endswith(".weight")} | {n.split(".")[-1] for n in names} >= \
            {"wqkv", "wo", "w13", "w2"}
        assert not any(k in n for n, _ in hidden for k in ("embed", "norm", "router", "lm_head"))
        assert len(hidden) + len(rest) == len(list(model.parameters()))
        cfg = model.cfg
        wqkv = dict(hidden)["layers.0.attn.wqkv.weight"]
        assert wqkv.muon_splits == [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2


def test_wsd_schedule_is_flat_then_a_straight_decay():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.1)
    assert get_lr(4, 0.05, cfg) == pytest.approx(1e-3 * 0.5)  # warmup as with the cosine
    assert get_lr(50, 0.3, cfg) == get_lr(70, 0.75, cfg) == pytest.approx(1e-3)  # stable to 75% of the run
    assert get_lr(80, 0.875, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway down the decay
    assert get_lr(100, 1.0, cfg) == pytest.approx(1e-4)
    none = dataclasses.replace(cfg, decay_fraction=0.0)
    assert get_lr(100, 1.0, none) == pytest.approx(1e-3)


def test_a_short_muon_run_learns(tmp_path, data_dir):
    out = tmp_path / "run"
    final = train(tcfg_for(data_dir, out, max_steps=30, eval_interval=30, optimizer="muon", muon_lr=0.02,
                           schedule="wsd"), TRAIN_CFG)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert final["final_val_loss"] < losses[0]


def test_muon_experts_false_gives_the_experts_to_adamw():
    from tinymixtral.optim import make_optimizer
    model = tiny_model()
    by_group = {}
    for flag in (True, False):
        opt = make_optimizer(model, dataclasses.replace(TrainConfig(), optimizer="muon", muon_experts=flag), "cpu")
        by_group[flag] = {id(p): g["use_muon"] for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    experts = {i for i, n in names.items() if ".experts." in n}
    assert experts and all(by_group[True][i] for i in experts) and not any(by_group[False][i] for i in experts)
    # everything else keeps its optimizer, and every parameter is in exactly one group
    assert all(by_group[True][i] == by_group[False][i] for i in names if i not in experts)
    assert set(by_group[False]) == set(names)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_router_lr_gives_the_routers_their_own_group(optimizer):
    from tinymixtral.optim import make_optimizer, peak_lr
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    plain = make_optimizer(model, dataclasses.replace(TrainConfig(), optimizer=optimizer), "cpu")
    assert not any(g.get("router") for g in plain.param_groups)  # without --router-lr: the groups as before
    tcfg = dataclasses.replace(TrainConfig(), optimizer=optimizer, lr=3e-3, router_lr=5e-4)
    opt = make_optimizer(model, tcfg, "cpu")
    (group,) = [g for g in opt.param_groups if g.get("router")]
    assert {names[id(p)] for p in group["params"]} == {n for n in names.values() if ".ffn.router." in n}
    assert group["lr"] == peak_lr(group, tcfg) == 5e-4
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(names)  # each in one group
    assert {peak_lr(g, tcfg) for g in opt.param_groups if not g.get("router")} <= {3e-3, tcfg.muon_lr}


def test_router_lr_scales_with_the_schedule(data_dir, tmp_path):
    """A tiny --router-lr leaves the routers where they started while everything else trains."""
    from tinymixtral.checkpoint import load_model
    train(tcfg_for(data_dir, tmp_path / "run", max_steps=4, eval_interval=4, ckpt_interval=4, router_lr=1e-12),
          TRAIN_CFG)
    # the same seed, one step with every rate ~0: the initial weights
    train(tcfg_for(data_dir, tmp_path / "start", max_steps=1, eval_interval=1, ckpt_interval=1, router_lr=1e-12,
                   lr=1e-12, muon_lr=1e-12), TRAIN_CFG)
    trained, start = (load_model(tmp_path / d / "latest").state_dict() for d in ("run", "start"))
    moved = {k: (trained[k] - start[k]).abs().max().item() for k in trained}
    routers = [k for k in moved if ".router." in k]
    assert routers and all(moved[k] < 1e-6 for k in routers), {k: moved[k] for k in routers}
    assert max(v for k, v in moved.items() if k not in routers) > 1e-3


@pytest.mark.parametrize("native", [True, False])
def test_autocast_auto_and_newton_schulz_follow_native_bf16(tmp_path, data_dir, monkeypatch, native):
    """`--autocast auto` (the recipes' choice) trains in bf16 and Muon orthogonalises in bf16 exactly where the
    device multiplies bf16 natively (params.fast_bf16: AVX512-BF16 or AMX on a CPU); fp32 elsewhere."""
    from tinymixtral import optim, params
    from tinymixtral import train as train_mod

    for mod in (optim, train_mod):
        monkeypatch.setattr(mod, "fast_bf16", lambda device: native)
    opt = optim.make_optimizer(tiny_model(), TrainConfig(optimizer="muon"), "cpu")
    assert opt.defaults["ns_dtype"] == ("bfloat16" if native else "float32")
    out = tmp_path / "run"
    train(tcfg_for(data_dir, out, max_steps=2, eval_interval=100, log_interval=1, optimizer="muon",
                   autocast="auto"), TRAIN_CFG)
    assert {r["autocast"] for r in read_metrics(out) if "loss" in r} == {"bfloat16" if native else "none"}
    assert isinstance(params.fast_bf16("cpu"), bool) and params.fast_bf16("meta") is False
