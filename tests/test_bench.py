"""`gradserve bench` end to end with tiny windows: the report's structure, and every scenario of every target
produced requests with zero errors (behaviour, not timing). Plus the load generator's bookkeeping."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from run_fixtures import make_run

from bench import harness, loadgen

ROOT = Path(__file__).resolve().parent.parent
GRADSERVE = Path(sys.executable).parent / "gradserve"


def test_closed_loop_counts_requests_and_errors() -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        mine = calls  # the other worker counts on while this one sleeps
        await asyncio.sleep(0.001)
        if mine % 2 == 0:
            raise ValueError("every second call fails")

    window = asyncio.run(loadgen.closed_loop([flaky, flaky], seconds=0.3, rows=3))
    summary = window.summary()
    assert summary["requests"] + summary["errors"] == calls >= 2  # each worker sends at least once
    assert summary["errors"] == calls // 2
    assert summary["rows_s"] == pytest.approx(3 * summary["req_s"])
    assert summary["p50_ms"] <= summary["p99_ms"]
    assert summary["error_samples"] == ["ValueError: every second call fails"]


@pytest.mark.timeout(900)
def test_bench_quick_run_measures_every_path(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs")
    out = tmp_path / "results"
    done = subprocess.run(
        [str(GRADSERVE), "bench", "--run", str(run), "--quick", "--seconds", "0.3", "--warmup", "0.1",
         "--jvm-warmup", "0.2", "--batch-rows", "2048", "--max-attempts", "1", "--out-dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = out.glob("*.json")
    results = json.loads(report.read_text())

    measured = {(w["target"], w["scenario"]): w for w in results["windows"]}
    expected = {(t, s.name) for t in ("torchserve_grpc", "torchserve_rest", "frontdoor_grpc", "frontdoor_stream",
                                      "frontdoor_rest") for s in harness.SCENARIOS}
    expected |= {("torchserve_grpc_nobatch", "c1"), ("torchserve_grpc_nobatch", "c64")}
    assert set(measured) == expected
    for key, w in measured.items():
        assert w["requests"] > 0 and w["errors"] == 0, (key, w["error_samples"])
        assert w["p50_ms"] <= w["p90_ms"] <= w["p99_ms"]
        assert w["rows_s"] == pytest.approx(w["req_s"] * w["rows"])
        assert {"loadgen", "ts_java", "ts_worker"} <= set(w["cpu_s"]), key
        assert ("frontdoor" in w["cpu_s"]) == key[0].startswith("frontdoor")

    assert results["batch"]["rows"] == 2048 and results["batch"]["failed"] == 0
    assert results["in_process"]["ceiling"]["rows_s"] > 0 and results["in_process"]["batch_raw"]["rows_s"] > 0
    assert len(results["ratios"]) == 7 and all(r["value"] == r["value"] for r in results["ratios"])  # no NaN
    table = report.with_suffix(".md").read_text()
    assert "| target | scenario | req/s |" in table and "| figure | value | target | met |" in table
    assert report.with_suffix(".png").stat().st_size > 0
