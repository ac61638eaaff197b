"""`gradserve bench` end to end with tiny windows on two models (the digits demo and the tabular example, trained
for the bench): the report's structure, and every scenario of every target of every model produced requests with
zero errors (behaviour, not timing). Plus the load generator's bookkeeping, its HTTP/1.1 client against a real
socket server, the peers' model against the handler's, and the bench's word on a peer that is not installed."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from run_fixtures import make_run

from bench import backend_transport, cuda_check, frontdoor_ab, harness, loadgen, peer_stacks, report, rest_parse
from bench.models import sample_rows
from bench.peers.model import PeerModel
from gradserve.errors import UsageError
from handlers import codec
from handlers.local import LocalModel
from handlers.manifest import Manifest
from handlers.threads import Threads

ROOT = Path(__file__).resolve().parent.parent
GRADSERVE = Path(sys.executable).parent / "gradserve"
MODELS = ("digits", "cancer")


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


def test_oip_rest_payload_is_the_rows_and_its_check_reads_any_servers_shape() -> None:
    x = np.array([[0.5, 0.125, 1.0]], dtype=np.float32)
    body, content_type = loadgen.OipRest("http://127.0.0.1:1", None, model="m").payload(x)
    sent = json.loads(body)["inputs"][0]
    assert content_type == "application/json" and sent["shape"] == [1, 3] and sent["data"] == [0.5, 0.125, 1.0]
    target = loadgen.OipRest("http://127.0.0.1:1", None, model="m")
    target.check(b'{"model_name":"m","outputs":[{"name":"logits","shape":[2,10],"data":[]}]}', 2)
    target.check(b'{"outputs": [{"name": "logits", "datatype": "FP32", "shape": [ 2, 10 ], "data": []}]}', 2)
    with pytest.raises(loadgen.AnswerError):
        target.check(b'{"outputs":[{"shape":[1,10]}]}', 2)
    with pytest.raises(loadgen.AnswerError):
        target.check(b'{"error":"no"}', 2)


def test_peers_model_answers_as_the_handler_does(tmp_path: Path) -> None:
    """What every peer serves (bench/peers/model.py, run here without any peer installed): the archive's model
    rebuilt from the unpacked archive, standardised; its logits are the handler's, [n, K]."""
    from training.package import PackageConfig, package

    archive = package(make_run(tmp_path / "runs"), PackageConfig(model_store=str(tmp_path / "store")))
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(tmp_path / "model")
    model = PeerModel.load(tmp_path / "model", Threads(most=1))
    x = sample_rows(Manifest.from_archive(archive), 5)
    logits = model.predict(x)
    with LocalModel(archive) as local:
        (answer,) = local.handle([codec.encode({"input": x})])
    assert model.output == "logits" and model.row_shape == (1, 8, 8) and logits.shape == (5, 10)
    np.testing.assert_allclose(logits, codec.decode(answer).tensors["logits"], rtol=1e-5, atol=1e-5)


def test_a_missing_peer_says_how_to_make_it_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    found, missing = peer_stacks.select(["mlserver", "triton"], venvs=tmp_path)
    assert found == [] and len(missing) == 2 and all("make bench-peers" in line for line in missing)
    with pytest.raises(UsageError, match="unknown peer"):
        peer_stacks.select(["torchserve-classic"], venvs=tmp_path)


@pytest.mark.timeout(900)
def test_backend_transport_calls_a_real_torchserve_over_both_of_its_apis(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "transport.json"
    assert backend_transport.main(["--run", str(tmp_path / "no-run"), "--out", str(out)]) == 2
    assert "make run" in capsys.readouterr().err and not out.exists()
    argv = ["--run", str(make_run(tmp_path / "runs")), "--seconds", "0.3", "--rounds", "1", "--out", str(out)]
    assert backend_transport.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert sorted((r["way"], r["concurrency"]) for r in results) == [("grpc", 1), ("grpc", 8), ("http", 1), ("http", 8)]
    for r in results:
        assert r["calls_s"] > 0 and set(r["cpu_ms_per_call"]) == {"caller", "torchserve_java", "torchserve_worker"}
        assert r["cpu_ms_per_call"]["torchserve_worker"] > 0  # the calls reached the handler


def test_rest_parse_reads_every_body_both_ways_and_writes_the_table(tmp_path: Path) -> None:
    """Both parsers read each body to the same array (the module checks it before timing) and the table has a row
    per model and row count."""
    out = tmp_path / "rest_parse.json"
    assert rest_parse.main(["--seconds", "0.01", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {(r["model"], r["rows"]) for r in results} == {(m, n) for m in rest_parse.SHAPES for n in rest_parse.ROWS}
    assert all(r["simdjson_ms"] > 0 and r["general_ms"] > 0 for r in results)


def test_bench_quick_run_measures_every_path_of_every_model(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs")
    out = tmp_path / "results"
    done = subprocess.run(
        [str(GRADSERVE), "bench", "--run", str(run), "--models", ",".join(MODELS), "--runs-dir",
         str(tmp_path / "example-runs"), "--train-epochs", "2", "--quick", "--seconds", "0.3", "--warmup", "0.1",
         "--jvm-warmup", "0.2", "--batch-rows", "2048", "--max-attempts", "1", "--out-dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = out.glob("*.json")
    results = json.loads(report.read_text())

    measured = {(w["model"], w["target"], w["scenario"]): w for w in results["windows"]}
    targets = ("torchserve_grpc", "torchserve_rest", "frontdoor_grpc", "frontdoor_stream", "frontdoor_rest")
    expected = {(m, t, s.name) for m in MODELS for t in targets for s in harness.SCENARIOS}
    expected |= {(m, "torchserve_grpc_nobatch", s) for m in MODELS for s in ("c1", "c64")}
    assert set(measured) == expected
    for key, w in measured.items():
        assert w["requests"] > 0 and w["errors"] == 0, (key, w["error_samples"])
        assert w["p50_ms"] <= w["p90_ms"] <= w["p99_ms"]
        assert w["rows_s"] == pytest.approx(w["req_s"] * w["rows"])
        assert {"loadgen", "ts_java", "ts_worker"} <= set(w["cpu_s"]), key
        assert ("frontdoor" in w["cpu_s"]) == key[1].startswith("frontdoor")

    assert (tmp_path / "example-runs" / "cancer" / "selection.json").exists()  # trained for the bench
    for model in MODELS:
        assert results["batch"][model]["rows"] == 2048 and results["batch"][model]["failed"] == 0
        assert results["in_process"][model]["ceiling"]["rows_s"] > 0
        assert results["in_process"][model]["batch_raw"]["rows_s"] > 0
    assert len(results["ratios"]) == 7 * len(MODELS) and all(r["value"] == r["value"] for r in results["ratios"])
    assert results["peer_ratios"] == []  # no peers asked for
    table = report.with_suffix(".md").read_text()
    assert "| model | target | scenario | req/s |" in table and "| model | figure | value | target | met |" in table
    assert "Load generator CPU per request" in table
    assert report.with_suffix(".png").stat().st_size > 0


def test_the_c1_targets_hold_each_transport_to_kserve_on_the_same_transport() -> None:
    """p50 at most 1 ms above KServe's and server CPU at most 2x, gRPC against its gRPC and REST against its REST;
    a transport KServe did not run is left out."""
    def window(p50_ms: float, cpu_s: dict[str, float]) -> dict:
        return {"p50_ms": p50_ms, "cpu_s": cpu_s, "requests": 1000}

    w = {("frontdoor_grpc", "c1"): window(2.2, {"frontdoor": 0.8, "ts_java": 0.4, "ts_worker": 0.8, "loadgen": 9}),
         ("kserve_grpc", "c1"): window(1.0, {"peer": 0.8}),
         ("frontdoor_rest", "c1"): window(1.4, {"frontdoor": 0.5, "ts_java": 0.3, "ts_worker": 0.6}),
         ("kserve_rest", "c1"): window(0.8, {"peer": 0.8})}
    rows = [(figure, round(value, 3), met) for figure, value, _, met in report.c1_targets(w)]
    assert rows == [
        ("p50 at c=1: front door gRPC - KServe gRPC (unbatched, in-process), ms", 1.2, False),
        ("server CPU per request at c=1: front door gRPC / KServe gRPC", 2.5, False),
        ("p50 at c=1: front door REST - KServe REST (unbatched, in-process), ms", 0.6, True),
        ("server CPU per request at c=1: front door REST / KServe REST", 1.75, True)]
    del w[("kserve_rest", "c1")]
    assert [figure for figure, *_ in report.c1_targets(w)] == [
        "p50 at c=1: front door gRPC - KServe gRPC (unbatched, in-process), ms",
        "server CPU per request at c=1: front door gRPC / KServe gRPC"]


def test_frontdoor_ab_settings_are_dotted_names_with_yaml_values() -> None:
    assert frontdoor_ab.sections(["event_loop=asyncio", "coalesce.max_delay_ms=1.5", "coalesce.max_rows=0",
                                  "package.optimize=true"]) == {
        "serve": {"event_loop": "asyncio", "coalesce": {"max_delay_ms": 1.5, "max_rows": 0}},
        "package": {"optimize": True}}
    with pytest.raises(UsageError, match="name=value"):
        frontdoor_ab.sections(["event_loop"])


def test_cuda_check_without_a_gpu_runs_dry_on_the_cpu_and_writes_every_figure(tmp_path: Path) -> None:
    """The GPU check's script on a CPU (--dry-run, both handlers on the CPU): agreement 0, a row alone as in its
    batch within 1e-5, and rows/s for every row count up to the archive's max_rows. Without --dry-run it refuses."""
    from training.package import PackageConfig, package

    archive = package(make_run(tmp_path / "runs"), PackageConfig(model_store=str(tmp_path / "store"), max_rows=64))
    out = tmp_path / "cuda.json"
    assert cuda_check.main(["--archive", str(archive), "--seconds", "0.02", "--dry-run", "--out", str(out)]) == 0
    (model,) = json.loads(out.read_text())["models"]
    assert model["agreement"]["gpu_vs_cpu"] == 0 and max(model["agreement"].values()) < 1e-5
    assert [r["rows"] for r in model["throughput"]] == [1, 16, 64]
    assert all(v > 0 for r in model["throughput"] for v in r.values())
    if not cuda_check.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cuda_check.main(["--archive", str(archive)])


def test_frontdoor_ab_loads_and_ways_are_read_or_refused_with_the_form() -> None:
    assert frontdoor_ab.loads("1x1,32x64") == ((1, 1), (32, 64))
    assert frontdoor_ab.ways("grpc,rest") == ("grpc", "rest")
    with pytest.raises(argparse.ArgumentTypeError, match="concurrency x rows, e.g. 1x1"):
        frontdoor_ab.loads("64")
    with pytest.raises(argparse.ArgumentTypeError, match="some of grpc,stream,rest"):
        frontdoor_ab.ways("grpc,soap")
    assert frontdoor_ab.env_vars(["GRPC_EXPERIMENTS=", "OMP_NUM_THREADS=1"]) == {"GRPC_EXPERIMENTS": "",
                                                                               "OMP_NUM_THREADS": "1"}
    with pytest.raises(UsageError, match="NAME=value"):
        frontdoor_ab.env_vars(["OMP_NUM_THREADS"])


@pytest.mark.timeout(900)
def test_frontdoor_ab_serves_every_way_from_both_sides(tmp_path: Path) -> None:
    """Two real front doors, one on each event loop (the asyncio one is served nowhere else in the tests), the second
    on an archive packaged to serve its compiled forward: every way and load answered by both, and the table has
    their medians."""
    out = tmp_path / "ab.json"
    argv = ["--run", str(make_run(tmp_path / "runs")), "--a", "event_loop=asyncio", "--a-env", "GRPC_EXPERIMENTS=",
            "--b", "event_loop=uvloop", "package.optimize=true", "--rounds", "1", "--seconds", "0.2", "--out", str(out)]
    assert frontdoor_ab.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["sides"] == {"a": {"serve": {"event_loop": "asyncio"}, "package": {}},
                               "b": {"serve": {"event_loop": "uvloop"}, "package": {"optimize": True}}}
    assert report["env"] == {"a": {"GRPC_EXPERIMENTS": ""}, "b": {}}
    cells = {(r["way"], r["concurrency"], r["rows"], r["side"]) for r in report["rounds"]}
    assert cells == {(w, c, n, s) for w in frontdoor_ab.WAYS for c, n in frontdoor_ab.LOADS for s in "ab"}
    for r in report["rounds"]:  # window() raises on any failed request
        assert r["req_s"] > 0 and r["server_cpu_ms"] >= r["door_cpu_ms"] > 0
    assert len(report["medians"]) == len(frontdoor_ab.WAYS) * len(frontdoor_ab.LOADS)
