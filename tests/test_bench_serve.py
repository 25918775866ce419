"""tools/bench_serve.py bookkeeping: speed-ups against the byte ceiling and the decode-cost line fit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_serve  # noqa: E402


def row(model: str, file_bytes: int, seconds_per_token: float, outtype: str = "f16") -> dict:
    tps = 1.0 / seconds_per_token
    return {"model": model, "engine": "llama.cpp", "outtype": outtype, "file_bytes": file_bytes,
            "pp": {"median_tps": 2 * tps, "best_tps": 2 * tps}, "tg": {"median_tps": tps, "best_tps": tps}}


def synthetic_rows(fixed: float, bandwidth: float) -> list[dict]:
    return [row(name, size, fixed + size / bandwidth) for name, size in
            (("dense", 270_000_000), ("p20", 216_000_000), ("p50", 135_000_000))]


def test_memory_bound_decode_reaches_the_byte_ceiling():
    rows = synthetic_rows(fixed=0.0, bandwidth=20e9)
    by_model = {s["model"]: s for s in bench_serve.speedups(rows)}
    assert by_model["p50"]["ceiling"] == pytest.approx(2.0)
    assert by_model["p50"]["decode_speedup"] == pytest.approx(2.0)
    assert by_model["p50"]["ratio_to_ceiling"] == pytest.approx(1.0)
    fit, = bench_serve.decode_cost_fits(rows)
    assert fit["fixed_ms_per_token"] == pytest.approx(0.0, abs=1e-9)
    assert fit["bandwidth_gb_s"] == pytest.approx(20.0)


def test_fixed_cost_per_token_is_recovered_and_explains_the_shortfall():
    rows = synthetic_rows(fixed=0.005, bandwidth=25e9)
    fit, = bench_serve.decode_cost_fits(rows)
    assert fit["fixed_ms_per_token"] == pytest.approx(5.0)
    assert fit["bandwidth_gb_s"] == pytest.approx(25.0)
    assert fit["max_residual"] < 1e-9
    p50 = fit["models"]["p50"]
    expected = (0.005 + 270e6 / 25e9) / (0.005 + 135e6 / 25e9)
    assert p50["ceiling_with_fixed"] == pytest.approx(expected)
    assert p50["measured"] == pytest.approx(expected)
    assert expected < 2.0 * 0.9  # below 90 % of the byte ceiling, and the fit says why
    text = bench_serve.markdown({"prompt_tokens": 512, "decode_tokens": 128, "rows": rows,
                                 "speedups": bench_serve.speedups(rows), "decode_cost": [fit]})
    assert "5.00 ms + file bytes / 25.0 GB/s" in text
