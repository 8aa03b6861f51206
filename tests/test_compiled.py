"""The compiled paths equal the eager ones: the decode step (torch.compile over a static view of the cache)
and a training step (what `train --compile` and `bench` compile)."""

from __future__ import annotations

import pytest
import torch

from torch._dynamo.utils import counters

from conftest import DECODE, tiny_model
from tinymixtral import generation
from tinymixtral.cache import KVCache
from tinymixtral.errors import TinyMixtralError
from tinymixtral.generation import decode_compiled, generate, left_pad
from tinymixtral.model import cpu_kernels, fused, quant
from tinymixtral.model.quant import _Quantized
from tinymixtral.quantize import quantize_model



@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Each test compiles from scratch: past dynamo's recompile limit it would fall back to eager silently,
    and the compiled-vs-eager comparisons would compare eager with eager. The fused CPU step (test_fused.py) is
    off here, so that generation compiles and its eager steps are the modules'."""
    monkeypatch.setattr(fused, "ENABLED", False)
    torch._dynamo.reset()
    generation._compiled_steps.clear()  # the CPU's ahead-of-time compiled steps (generation._compile_step)
    counters.clear()
    yield
    torch._dynamo.reset()
    generation._compiled_steps.clear()


def teacher_forced(model, prompts, steps):
    """Logits of each decode step, eager and compiled, fed the same tokens (eager's argmax)."""
    ids, pos = left_pad(prompts)
    B = ids.shape[0]
    eager, comp = KVCache.for_model(model, B, 40), KVCache.for_model(model, B, 40)
    out_e, out_c = [], []
    with torch.no_grad():
        logits = model(ids, cache=eager, positions_BS=pos)
        model(ids, cache=comp, positions_BS=pos)
        nxt, next_pos = logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:] + 1
        for _ in range(steps):
            out_e.append(model(nxt, cache=eager, positions_BS=next_pos))
            out_c.append(decode_compiled(model, comp, nxt, next_pos))
            nxt, next_pos = out_e[-1][:, -1].argmax(-1, keepdim=True), next_pos + 1
    return torch.cat(out_e, 1), torch.cat(out_c, 1), eager, comp


@pytest.mark.slow
def test_each_generation_finds_the_step_its_guards_accept(monkeypatch):
    """Compiled steps skip their guards within a generation but check them at its start: a second model with the
    same shapes and weights but another rope theta (a constant of the graph), then a batch of 2, each get a step of
    their own and decode as they do eagerly; the first model then reuses its own."""
    a = tiny_model(DECODE)
    b = tiny_model(DECODE, rope_theta=10.0)
    b.load_state_dict(a.state_dict())
    prompt = torch.tensor([[1, 2, 3]])
    for model, x in ((a, prompt), (b, prompt), (a, prompt.expand(2, 3)), (a, prompt)):
        eager_e, comp_e, _, _ = teacher_forced(model, x.tolist(), 6)
        torch.testing.assert_close(comp_e, eager_e, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(teacher_forced(a, [[1, 2, 3]], 6)[0], teacher_forced(b, [[1, 2, 3]], 6)[0])
    assert len(generation._compiled_steps["cpu"]) == 3
    assert torch.equal(generate(b, prompt, 8, compile=True), generate(b, prompt, 8))
    monkeypatch.setattr(generation, "MAX_STEPS", 3)  # a fourth step: the oldest goes
    oldest = generation._compiled_steps["cpu"][0]
    assert torch.equal(generate(b, prompt.expand(3, 3), 4, compile=True), generate(b, prompt.expand(3, 3), 4))
    assert len(generation._compiled_steps["cpu"]) == 3 and oldest not in generation._compiled_steps["cpu"]


@pytest.mark.slow
def test_compiled_steps_equal_eager_steps():
    """Ragged batch of 3 (left padding), a window of 8 slots that wraps twice, and N*K > E (so eager
    takes the grouped expert path and compiled the gathered one)."""
    model = tiny_model(DECODE)
    eager_logits, comp_logits, eager, comp = teacher_forced(model, [[5, 6, 7, 8, 9], [10, 11, 12], [13]], 14)
    torch.testing.assert_close(comp_logits, eager_logits, rtol=1e-5, atol=1e-5)
    # it really compiled, into one graph: no graph break (a host sync, a Python number) splits the step
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert comp.t == eager.t == 5 + 14
    assert torch.equal(comp.pos, eager.pos)  # same slots hold the same positions
    torch.testing.assert_close(comp.k, eager.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.v, eager.v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_inference_records_no_routing():
    """model.routing(), which losses and analysis read, is set by eager forwards and by compiled training ones (the
    training tests below), not by a compiled forward at inference: replaying it cost ~4 % of a decode step."""
    model = tiny_model(DECODE).eval()
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        model(ids)
        before = model.routing()
        torch.compile(model, fullgraph=True)(ids[:, :3])
        assert all(a is b for a, b in zip(model.routing(), before)) and len(model.routing()) == len(before) > 0
        model(ids[:, :3])
        assert model.routing()[0].experts_NK.shape[0] == 3  # eager again: recorded


def test_compiled_generate_equals_eager_dense_model():
    """A dense (Mistral-style) model without a window: a static cache of prompt + new tokens."""
    model = tiny_model(DECODE, seed=1, n_experts=0, sliding_window=None)
    prompt = torch.randint(0, 96, (1, 6))
    assert torch.equal(generate(model, prompt, 10, compile=True), generate(model, prompt, 10))


@pytest.mark.slow
def test_compiled_step_writes_the_cache_in_place():
    """The step writes one slot of each layer's keys and values into the cache tensor itself: no buffer of a
    layer's cache size is allocated (a write through a view of one layer was compiled into copies of the
    cache, per layer and step: 1.3 s a step with a 1 GB cache, 52 ms after), and the slot holds the keys."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model(DECODE, seed=3, n_layers=3, sliding_window=None)
    cache = KVCache.for_model(model, 1, 1000)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache, positions_BS=torch.arange(4)[None])
        _, code = run_and_get_code(decode_compiled, model, cache, torch.tensor([[5]]), torch.tensor([[4]]))
    layer_shape = str(tuple(cache.k.shape[1:]))  # (B, G, T, C)
    lines = "\n".join(code).splitlines()
    assert any(layer_shape[1:-1] in line for line in lines)  # the cache is in this code at all
    assert not [line for line in lines if "empty_strided" in line and layer_shape in line]
    eager = KVCache.for_model(model, 1, 1000)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5]]), cache=eager, positions_BS=torch.arange(5)[None])
    torch.testing.assert_close(cache.k[:, :, :, :5], eager.k[:, :, :, :5], rtol=1e-5, atol=1e-6)
    assert not cache.k[:, :, :, 5:].any()


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantized_decode(bits, monkeypatch):
    """int8 / int4: the compiled step calls the CPU kernel as one opaque op (each row's experts picked inside
    it): our C++ op itself where tinymixtral's kernels run, else torch's through `woq_mm`. So it equals the eager
    step; without the kernel (use_kernel False, as off the CPU) the fused dequantize-and-reduce agrees within
    bf16 rounding."""
    calls, kernel = [], cpu_kernels.kernel_matmul
    for where in (cpu_kernels, quant):  # woq_mm's, and the direct call (traced)
        monkeypatch.setattr(where, "kernel_matmul", lambda *a: calls.append(1) or kernel(*a))
    model = quantize_model(tiny_model(DECODE, seed=2, d_model=64, d_ff=64), bits, group_size=32 if bits == 4 else None)
    prompts = [[1, 2, 3, 4], [5, 6]]  # two rows: their experts differ
    eager_logits, comp_logits, _, comp = teacher_forced(model, prompts, 6)
    assert calls and not counters["graph_break"]
    torch.testing.assert_close(comp_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(comp_logits.argmax(-1), eager_logits.argmax(-1))
    with torch.no_grad(), torch.profiler.profile() as prof:  # one more compiled step: which ops it runs
        decode_compiled(model, comp, comp_logits[:, -1].argmax(-1, keepdim=True), torch.tensor([[10], [8]]))
    names = {e.name for e in prof.events()}
    if cpu_kernels.ours(bits):
        assert any(n.startswith("tinymixtral_avx2::") for n in names) and "tinymixtral::woq_mm" not in names
    else:
        assert "tinymixtral::woq_mm" in names
    monkeypatch.setattr(_Quantized, "use_kernel", False)
    calls.clear()
    eager_logits, comp_logits, _, _ = teacher_forced(model, prompts, 6)
    assert not calls
    torch.testing.assert_close(comp_logits, eager_logits, rtol=2e-2, atol=2e-2)
    assert (comp_logits.argmax(-1) == eager_logits.argmax(-1)).float().mean() > 0.8


def test_compile_failure_is_one_clear_error(monkeypatch):
    def broken(*args):
        raise RuntimeError("C++ compile error: no compiler found\n...many more lines...")

    monkeypatch.setattr(generation, "_compiled_steps", {})
    monkeypatch.setattr(generation, "_compile_step", broken)
    with pytest.raises(TinyMixtralError, match=r"^torch.compile failed \(C\+\+ compile error: no compiler found\)"):
        generate(tiny_model(DECODE), torch.tensor([[1, 2]]), 3, compile=True)


def test_auto_compiles_long_generations_where_it_pays(monkeypatch):
    """compile="auto" (the commands' default): compiled from AUTO_COMPILE_TOKENS new tokens, eager below, and
    eager for a quantized model whose compiled step would miss the kernels (an int4 head of 100 rows). The
    compiled step is replaced by the eager one here: this checks the choice."""
    model = tiny_model(DECODE)
    assert not generation.auto_compile(model, generation.AUTO_COMPILE_TOKENS - 1)
    assert generation.auto_compile(model, generation.AUTO_COMPILE_TOKENS)
    assert generation.auto_compile(quantize_model(tiny_model(DECODE), 8), generation.AUTO_COMPILE_TOKENS)
    odd = quantize_model(tiny_model(DECODE, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=100), 4, 32)
    with monkeypatch.context() as m:  # torch's kernels (as without AVX2), which take no head of 100 rows
        m.setattr(cpu_kernels, "avx2_kernels", lambda: False)
        assert not generation.auto_compile(odd, generation.AUTO_COMPILE_TOKENS)
    calls = []
    monkeypatch.setattr(generation, "_compiled_steps", {})
    monkeypatch.setattr(generation, "_compile_step", lambda dev, args: generation._Guarded(
        lambda *a: calls.append(1) or generation._decode_step(*a)))
    monkeypatch.setattr(generation, "AUTO_COMPILE_TOKENS", 6)
    prompt = torch.tensor([[1, 2, 3]])
    eager = generate(model, prompt, 6)
    assert torch.equal(generate(model, prompt, 5, compile="auto"), eager[:, :-1]) and calls == []
    assert torch.equal(generate(model, prompt, 6, compile="auto"), eager) and len(calls) == 5
    with pytest.raises(TinyMixtralError, match="compile must be"):
        generate(model, prompt, 6, compile="yes")


def test_auto_compile_failure_decodes_eagerly_with_one_warning(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("C++ compile error: no compiler found\n...many more lines...")

    monkeypatch.setattr(generation, "_compiled_steps", {})
    monkeypatch.setattr(generation, "_compile_step", broken)
    monkeypatch.setattr(generation, "AUTO_COMPILE_TOKENS", 4)
    model, prompt = tiny_model(DECODE), torch.tensor([[1, 2, 3], [4, 5, 6]])
    eager = generate(model, prompt, 8)
    capsys.readouterr()
    assert torch.equal(generate(model, prompt, 8, compile="auto"), eager)
    assert capsys.readouterr().err.splitlines() == [
        "warning: torch.compile failed (C++ compile error: no compiler found); decoding without compiling"]


@pytest.mark.slow
def test_auto_compiled_generation_and_chat_turns_equal_eager(monkeypatch):
    """Greedy tokens of a generation that compile="auto" compiles, and of a two-turn conversation on one cache
    (what `chat` does) compiled, equal the eager ones; all of it runs in one graph (same cache shape)."""
    monkeypatch.setattr(generation, "AUTO_COMPILE_TOKENS", 8)
    model, prompt = tiny_model(DECODE, seed=5), torch.randint(0, 96, (1, 5))
    assert torch.equal(generate(model, prompt, 20, compile="auto"), generate(model, prompt, 20))
    turns = {}
    for mode in (False, True):
        cache = KVCache.for_model(model, 1, 64)  # a windowed model: the window's 8 slots, as generate's cache
        a = [int(t) for t in generation.stream(model, [[1, 7, 8, 9]], 12, cache=cache, compile=mode)]
        b = [int(t) for t in generation.stream(model, [[a[-1], 2, 10, 11]], 12, cache=cache, compile=mode)]
        turns[mode] = (a, b)
    assert turns[True] == turns[False]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """Forward + backward of an fp32 MoE model under torch.compile: grouped_mm runs eagerly inside (its meta kernel
    refuses fp32), everything else is compiled; loss and gradients match the eager step."""
    model = tiny_model(DECODE, seed=3, router_aux_loss_coef=0.01).train()
    ids = torch.randint(0, 96, (2, 17))

    def loss_of(m):
        logits = m(ids[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.view(-1, 96), ids[:, 1:].reshape(-1))
        return ce + model.router_losses()["aux_loss"]

    eager = loss_of(model)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    comp = loss_of(torch.compile(model))
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_model_loss_equals_eager():
    """model(x, targets) -- what `train --compile` compiles -- gives the eager loss, router losses included."""
    model = tiny_model(DECODE, seed=4, router_aux_loss_coef=0.01, router_z_loss_coef=1e-3).train()
    ids = torch.randint(0, 96, (2, 17))
    eager, eager_parts = model(ids[:, :-1], ids[:, 1:])
    comp, comp_parts = torch.compile(model)(ids[:, :-1], ids[:, 1:])
    assert set(comp_parts) == set(eager_parts) == {"loss", "aux_loss", "z_loss"}
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for k in eager_parts:
        torch.testing.assert_close(comp_parts[k], eager_parts[k], rtol=1e-5, atol=1e-6, msg=k)
    ce = torch.nn.functional.cross_entropy(model(ids[:, :-1]).view(-1, 96), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(eager_parts["loss"], ce)
    torch.testing.assert_close(eager, sum(eager_parts.values()))


def test_compiled_bf16_moe_training_is_one_graph_close_to_eager():
    """Under bf16 autocast (training on a CPU with native bf16) a compiled MoE traces the experts' grouped products
    and their padded groups (of a fixed size when compiled): forward and backward are one graph, no break, and the
    loss and gradients are the eager step's within bf16 rounding (the same experts chosen)."""
    model = tiny_model(DECODE, seed=3, router_aux_loss_coef=0.01).train()
    ids = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(0))

    def step(m):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = m(ids[:, :-1], ids[:, 1:])
        loss.backward()
        chosen = [r.experts_NK.sort(-1).values for r in model.routing()]
        return loss.detach(), chosen, {n: p.grad.clone() for n, p in model.named_parameters()}

    eager = step(model)
    comp = step(torch.compile(model))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert all(torch.equal(a, b) for a, b in zip(comp[1], eager[1]))
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-2, atol=0)
    for n, g in eager[2].items():
        assert (comp[2][n] - g).norm() <= 0.05 * g.norm(), n
