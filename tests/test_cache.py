"""The KV cache: incremental decoding equals the full forward pass, the rolling buffer stays at W slots, and
a full static (compiled-decode) view is refused."""

import pytest
import torch

from conftest import DECODE, GEN, tiny_model
from tinymixtral.cache import KVCache
from tinymixtral.generation import decode_compiled, generate

@pytest.mark.parametrize("window", [8, None])
@pytest.mark.parametrize("pieces", [[1] * 40, [5, 7] + [1] * 28, [8, 8, 8, 8, 8], [3, 8, 1, 8, 6, 1, 8, 5]])
def test_incremental_equals_full_forward(window, pieces):
    model = tiny_model(GEN, sliding_window=window, vary_norms=True)
    x = torch.randint(0, 97, (2, sum(pieces)))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 2, x.shape[1])
        outs, i = [], 0
        for p in pieces:
            outs.append(model(x[:, i:i + p], cache=cache))
            i += p
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape[3] == (8 if window else 40)


def test_window_really_matters():
    """Guard for the test above: a model with and without the window must disagree past W tokens."""
    a, b = tiny_model(GEN, sliding_window=8, vary_norms=True), tiny_model(GEN, sliding_window=None, vary_norms=True)
    x = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        la, lb = a(x), b(x)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert (la[:, 8:] - lb[:, 8:]).abs().max() > 1e-3


def test_dense_model_cache():
    model = tiny_model(GEN, sliding_window=6, n_experts=0, vary_norms=True)
    x = torch.randint(0, 97, (1, 25))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 1, 25)
        inc = torch.cat([model(x[:, :4], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(4, 25)], 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_long_generation_keeps_cache_at_window(monkeypatch):
    """4,000 tokens from a windowed model: the cache never grows past W slots, and the last logits still
    equal a full forward pass over the whole sequence."""
    model = tiny_model(GEN, sliding_window=16, n_layers=1, vocab_size=50, vary_norms=True)
    made = []
    real = KVCache.for_model.__func__

    def spy(cls, m, batch, max_len):
        made.append(real(cls, m, batch, max_len))
        return made[-1]

    monkeypatch.setattr(KVCache, "for_model", classmethod(spy))
    prompt = torch.randint(0, 50, (1, 10))
    out = generate(model, prompt, 4000, temperature=1.0, seed=0)
    assert out.shape == (1, 4010)
    cache = made[0]
    assert tuple(cache.k.shape) == (1, 1, 2, 16, 8) and tuple(cache.v.shape) == (1, 1, 2, 16, 8)
    assert tuple(cache.pos.shape) == (1, 16) and cache.t == 4009
    with torch.no_grad():
        full = model(out[:, :-1])[:, -1]
        c2 = KVCache.for_model(model, 1, 4009)
        for i in range(0, 4009, 16):
            last = model(out[:, i:min(i + 16, 4009)], cache=c2)[:, -1]
    torch.testing.assert_close(last, full, atol=1e-4, rtol=1e-4)


def test_full_static_cache_is_refused():
    model = tiny_model(DECODE, sliding_window=None)
    cache = KVCache.for_model(model, 1, 4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="full"):
        decode_compiled(model, cache, torch.tensor([[5]]), torch.tensor([[4]]))
