"""The decode fast paths equal the plain ones: the row-split `linear`, the few-token (gathered) expert path,
and batch-1 decode through both."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import DECODE, make_moe, moe_cfg, no_loop, ref_moe, tiny_model
from tinymixtral.cache import KVCache
from tinymixtral.model import fast, gemv
from tinymixtral.model.fast import FEW_ROWS, experts_few, linear


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("x_shape", [(1, 1, 48), (4, 1, 48), (1, FEW_ROWS, 48), (2, 9, 48), (48,)])
@pytest.mark.parametrize("O", [96, 97])  # 97: rows do not split evenly over the threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_f_linear(n_threads, x_shape, O, dtype, monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(*x_shape, dtype=dtype), torch.randn(O, 48, dtype=dtype)
    want = F.linear(x, w)
    rows = x.numel() // 48
    monkeypatch.setattr(gemv, "ready", lambda: False)  # the AVX2 kernel (test_gemv.py) would take these
    if rows <= FEW_ROWS and O % n_threads == 0:  # the split path must run: F.linear would fail the test
        monkeypatch.setattr(fast, "F", SimpleNamespace(linear=None))
    with threads(n_threads):
        y = linear(x, w)
    assert y.shape == want.shape and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)


def test_linear_gradients_equal_f_linear():
    torch.manual_seed(0)
    x, w = torch.randn(2, 1, 32, requires_grad=True), torch.randn(64, 32, requires_grad=True)
    g = torch.randn(2, 1, 64)
    with threads(2):
        gx, gw = torch.autograd.grad((linear(x, w) * g).sum(), (x, w))
    rx, rw = torch.autograd.grad((F.linear(x, w) * g).sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("N,E,K", [(1, 4, 2), (2, 4, 2), (1, 8, 2), (2, 8, 2), (3, 8, 2), (4, 8, 2), (1, 6, 3),
                                   (2, 6, 3)])
def test_few_token_experts_equal_reference(N, E, K, monkeypatch):
    """N*K <= E under no_grad takes experts_few; it must equal the loop reference and the grouped path."""
    cfg = moe_cfg(E=E, K=K)
    m = make_moe(cfg).eval()
    x = torch.randn(1, N, cfg.d_model)
    ref, _ = ref_moe(x, m.router.weight, m.experts.w13, m.experts.w2, K)
    grouped = m(x).detach()  # grad enabled: the sorted grouped path
    monkeypatch.setattr(fast, "grouped_mm", no_loop)  # from here on, the grouped path would fail
    monkeypatch.setattr(gemv, "ready", lambda: False)  # and the AVX2 experts op (test_gemv.py) would take it
    for n_threads in (1, 2):
        with threads(n_threads), torch.no_grad():
            few = m(x)
        torch.testing.assert_close(few, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(few, grouped, rtol=1e-5, atol=1e-5)


def test_few_token_path_with_repeated_experts():
    """Two tokens that chose the same expert share one product; weights stay with their tokens."""
    cfg = moe_cfg(E=8, K=2)
    m = make_moe(cfg).eval()
    x = torch.randn(3, cfg.d_model)
    experts = torch.tensor([[5, 1], [1, 5], [2, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    with torch.no_grad():
        few = experts_few(m.experts, x, weights, experts)
    ref, _ = ref_moe(x[None], m.router.weight, m.experts.w13, m.experts.w2, 2, routing=(weights, experts))
    torch.testing.assert_close(few, ref[0], rtol=1e-5, atol=1e-5)


def test_decode_with_fast_paths_equals_full_forward():
    """Batch-1 decode on 2 threads (row-split linear + few-token experts) reproduces the full forward's logits."""
    model = tiny_model(DECODE)
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        full = model(ids)
        with threads(2):
            cache = KVCache.for_model(model, 1, 20)
            steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(4, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_at_rate_p_and_scales_the_rest(p, dtype):
    """fast.dropout (16 random bits an element, four to a 64-bit draw): each of the four lanes of a draw drops at
    rate p (a 3-sigma band), kept elements are x / (1 - p) as F.dropout scales them, and the gradient is the mask."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 77777, dtype=dtype, requires_grad=True)  # not a multiple of 4 elements
    y = fast.dropout(x, p)
    kept = y != 0
    n = x.numel()
    for lanes in (kept.flatten(), *(kept.flatten()[j::4] for j in range(4))):
        band = 3 * math.sqrt(p * (1 - p) / lanes.numel())
        assert abs((1 - lanes.float().mean().item()) - p) < band
    scale = torch.tensor(1 / (1 - p)).to(dtype)
    assert torch.equal(y[kept], x[kept] * scale) and n > kept.sum() > 0
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, g * kept * scale)
    assert torch.equal(fast.dropout(x, 0.0), x)
    torch.manual_seed(3)
    a = fast.dropout(x, p)
    torch.manual_seed(3)
    assert torch.equal(a, fast.dropout(x, p))  # torch's generator: seeded runs repeat
