"""`tinymixtral bench` runs both models on the same weights and reports consistent numbers."""

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli, tiny_cfg
from tinymixtral.bench import build_pair, run_bench

BENCH = dict(d_ff=32, sliding_window=16, max_seq_len=128)  # tiny_cfg overrides


def test_same_weights_same_logits():
    ours, theirs = build_pair(tiny_cfg(**BENCH), "cpu", hf=True)
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x).logits, atol=1e-4, rtol=1e-4)


def test_run_bench_reports_every_phase():
    r = run_bench(tiny_cfg(**BENCH), batch=2, seq=32, decode_batches=(1, 2), new_tokens=4, rounds=2, compile=False)
    assert r["ours_compiled"] == []
    assert set(r["phases"]) == {"train 2x32", "prefill 1x32", "decode batch 1", "decode batch 2"}
    for row in r["phases"].values():
        for who in ("ours", "transformers"):
            m = row[who]
            assert m["min_s"] <= m["median_s"] <= m["max_s"] and m["tok_s"] > 0
        assert row["speedup"]["min"] <= row["speedup"]["median"] * 1.0001
    assert 0 < r["phases"]["train 2x32"]["ours"]["mfu"] < 1.5 and r["matmul_flops"] > 0


@pytest.mark.slow
def test_cli_json_and_bad_flags():
    out = run_cli("bench", "--preset", "demo", "--what", "prefill", "--seq", "16", "--rounds", "1", "--no-hf", "--json")
    assert out.returncode == 0, out.stderr
    assert "ours" in json.loads(out.stdout)["phases"]["prefill 1x16"]
    bad = run_cli("bench", "--preset", "demo", "--what", "fly", timeout=60)  # (an old slice cut "demo" off)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--what" in bad.stderr


@pytest.mark.parametrize("flag", [["--rounds", "0"], ["--decode-batch", "x"]])
def test_cli_rejects(flag):
    assert_one_line_error(run_cli("bench", "--no-hf", *flag, timeout=60), "bench", 2)


@pytest.mark.slow
def test_quantized_ours_against_full_transformers():
    """--bits times our int8 model (decode compiled, the default) against transformers' fp32 one; training is
    refused for it."""
    from tinymixtral.errors import TinyMixtralError

    cfg = tiny_cfg(**BENCH).replace(d_model=64, d_ff=64)  # int8 kernels want widths the packer accepts
    r = run_bench(cfg, what=("decode",), decode_batches=(1,), new_tokens=3, rounds=1, bits=8)
    assert r["ours_bits"] == 8 and r["ours_compiled"] == ["decode"] and r["phases"]["decode batch 1"]["transformers"]["tok_s"] > 0
    with pytest.raises(TinyMixtralError, match="inference"):
        run_bench(cfg, what=("train",), rounds=1, bits=8)


def test_vs_llama_cpp_every_precision_pair(capsys):
    """--vs llama.cpp: prefill and batch-1 decode for fp32/F32, int8/Q8_0, int4/Q4_0 on the same weights."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")
    from conftest import call_cli
    from tinymixtral.bench_llama import run_vs_llama

    cfg = tiny_cfg(**BENCH).replace(vocab_size=300)  # rows of 32 and 64: every Q4_0/Q8_0 block and int4 group fits
    r = run_vs_llama(cfg, seq=16, new_tokens=4, rounds=2, threads=1, compile=False)
    assert list(r["phases"]) == [f"{p}, {o} vs {t}" for o, t in (("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0"))
                                 for p in ("prefill 1x16", "decode batch 1")]
    for row in r["phases"].values():
        for who in ("ours", "llama.cpp"):
            assert row[who]["min_s"] <= row[who]["median_s"] <= row[who]["max_s"] and row[who]["tok_s"] > 0
        assert 0 < row["ratio"]["min"] <= row["ratio"]["median"] <= row["ratio"]["max"]
    capsys.readouterr()  # llama.cpp's own log lines
    bad = call_cli(capsys, "bench", "--vs", "llama.cpp", "--types", "fp16", "--no-compile")
    assert "--types takes fp32, int8, int4" in assert_one_line_error(bad, "bench", 2)
