"""One model's part of `gradserve bench`: its three archives, the in-process figures, then every way into it
(TorchServe direct, the front door, the peers) window by window, and the batch job.

    results = bench_model(config, model, shipped, work, serve_config, label, peers)
    results["windows"], results["in_process"], results["batch"], results["profile"], results["peers"]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import loadgen
from bench.measure import (
    BATCH_BYTES,
    BY_NAME,
    LOGITS,
    SCENARIOS,
    Bench,
    BenchConfig,
    Scenario,
    backend_calls,
    batch_job,
    in_process,
    profile_front_door,
    roles,
    summarize_profile,
)
from bench.models import BenchModel, sample_rows
from bench.peer_stacks import Peer, PeerServer, running_peer
from bench.stacks import FrontDoor, running_front_door, running_torchserve
from handlers.manifest import Manifest


@dataclass(frozen=True)
class Way:
    """One target of the run: how to build its client, which scenarios it runs, what it costs."""

    name: str
    make: Callable[[], loadgen.Target]
    scenarios: tuple[Scenario, ...]
    processes: Callable[[], dict[str, list[psutil.Process]]]
    backend_calls: Callable[[], tuple[float, float]] | None = None


def package_archives(run: Path, shipped: Any, work: Path) -> dict[str, Path]:
    """The run packaged three ways, each in a model store of its own: TorchServe's best direct setting (batchSize
    32, 5 ms), batching off, and the shipped settings the front door runs. The handler's forward chunk is measured
    once (for the front door's) and fixed in the other two, so that the three differ only in TorchServe's batching."""
    from training.package import package

    stores = {name: work / name for name in ("frontdoor", "batched", "unbatched")}
    archive = package(run, replace(shipped, model_store=str(stores["frontdoor"])), allow_fallback=True, force=True)
    fixed = replace(shipped, forward_rows=Manifest.from_archive(archive).forward_rows)
    for name, settings in {"batched": replace(fixed, batch_size=32, max_batch_delay_ms=5),
                           "unbatched": replace(fixed, batch_size=1, max_batch_delay_ms=0)}.items():
        package(run, replace(settings, model_store=str(stores[name])), allow_fallback=True, force=True)
    return stores


def bench_model(config: BenchConfig, model: BenchModel, shipped: Any, work: Path, serve_config: str, label: str,
                peers: list[Peer]) -> dict[str, Any]:
    """Everything measured on one model; `shipped` is the PackageConfig the front door's archive is built with."""
    print(f"== {model.name}: packaging {model.run} three ways", flush=True)
    stores = package_archives(model.run, shipped, work)
    archive = stores["frontdoor"] / f"{model.name}.mar"
    manifest = Manifest.from_archive(archive)
    row_bytes = 4 * int(np.prod(manifest.input.row_shape))
    batch_rows = sample_rows(manifest, max(256, min(config.batch_rows, BATCH_BYTES // row_bytes)), seed=1)
    print(f"{model.name}: in-process raw forward and handler, rows of {list(manifest.input.row_shape)}", flush=True)
    results: dict[str, Any] = {"in_process": in_process(stores["batched"] / f"{model.name}.mar", config.in_process_s,
                                                        batch_rows)}
    results["in_process"]["served"] = {"workers": shipped.max_workers or len(os.sched_getaffinity(0)),
                                       "torch_threads": shipped.torch_threads}
    rows = sample_rows(manifest, 256)
    with contextlib.ExitStack() as stack:
        door, ways = start_gradserve(stack, config, model.name, stores, work, serve_config)
        peer_ways, results["peers"] = start_peers(stack, peers, archive, work, model.name)
        results["windows"] = asyncio.run(run_windows(config, rows, model.name, ways + peer_ways))
        print(f"{model.name}: batch job, gradserve batch over {len(batch_rows)} rows", flush=True)
        results["batch"] = batch_job(door, model.name, batch_rows, work)
        print(f"  {results['batch']['rows_s']:.0f} rows/s, {results['batch']['failed']} failed", flush=True)
        results["profile"] = profile_under_load(config, door, ways[3], rows, label, model.name) if config.profile \
            else {}
    return results


def start_gradserve(stack: contextlib.ExitStack, config: BenchConfig, name: str, stores: dict[str, Path], work: Path,
                    serve_config: str) -> tuple[FrontDoor, list[Way]]:
    """TorchServe with its best direct setting, TorchServe with batching off, and the front door (with its own
    TorchServe), all at once (an idle one costs next to nothing), and the ways into them."""
    print(f"{name}: starting TorchServe (batchSize 32, 5 ms), TorchServe (batchSize 1) and the front door",
          flush=True)
    token, mar = os.urandom(12).hex(), (f"{name}.mar",)
    ts, keys = stack.enter_context(running_torchserve(stores["batched"], work / "ts-batched", models=mar))
    ts1, keys1 = stack.enter_context(running_torchserve(stores["unbatched"], work / "ts-unbatched", models=mar))
    door = stack.enter_context(running_front_door(stores["frontdoor"], work / "frontdoor", token,
                                                  config=serve_config, ready_timeout=240))
    key, key1 = keys.inference, keys1.inference
    in_ts = lambda: roles(psutil.Process(ts.pid), "ts_launcher")  # noqa: E731
    in_ts1 = lambda: roles(psutil.Process(ts1.pid), "ts_launcher")  # noqa: E731
    in_door = lambda: roles(psutil.Process(door.process.pid), "frontdoor")  # noqa: E731
    calls = lambda: backend_calls(door, name)  # noqa: E731
    ways = [
        Way("torchserve_grpc", lambda: loadgen.TorchServeGrpc(ts.endpoint.grpc_target, key, name), SCENARIOS, in_ts),
        Way("torchserve_rest", lambda: loadgen.TorchServeRest(ts.endpoint.inference_url, key, name), SCENARIOS,
            in_ts),
        Way("torchserve_grpc_nobatch", lambda: loadgen.TorchServeGrpc(ts1.endpoint.grpc_target, key1, name),
            (BY_NAME["c1"], BY_NAME["c64"]), in_ts1),
        Way("frontdoor_grpc", lambda: loadgen.OipGrpc(door.grpc_target, door.token, name, LOGITS), SCENARIOS, in_door,
            calls),
        Way("frontdoor_stream", lambda: loadgen.OipStream(door.grpc_target, door.token, name, LOGITS), SCENARIOS,
            in_door, calls),
        Way("frontdoor_rest", lambda: loadgen.OipRest(door.http_url, door.token, name, LOGITS), SCENARIOS, in_door,
            calls),
    ]
    return door, ways


def start_peers(stack: contextlib.ExitStack, peers: list[Peer], archive: Path, work: Path, name: str
                ) -> tuple[list[Way], dict[str, Any]]:
    """Each peer serving the same archive, and its gRPC and REST ways; a peer that fails to start is reported
    and left out."""
    ways, found = [], {}
    for peer in peers:
        print(f"{name}: starting peer {peer.name} ({peer.what})", flush=True)
        try:
            server = stack.enter_context(running_peer(peer, archive, work / f"peer-{peer.name}"))
        except Exception as e:  # noqa: BLE001 - a peer that does not start is a finding, not the end of the run
            print(f"  {peer.name} did not start: {type(e).__name__}: {str(e)[-1500:]}", flush=True)
            found[peer.name] = {"what": peer.what, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
            continue
        found[peer.name] = {"what": peer.what, "server": server.metadata()}
        ways += peer_ways(server)
    return ways, found


def peer_ways(server: PeerServer) -> list[Way]:
    processes = lambda: roles(psutil.Process(server.process.pid), "peer", classify=lambda _: "peer")  # noqa: E731
    name, model = server.peer.name, server.model
    return [Way(f"{name}_grpc", lambda: loadgen.OipGrpc(server.grpc_target, None, model), SCENARIOS, processes),
            Way(f"{name}_rest", lambda: loadgen.OipRest(server.http_url, None, model), SCENARIOS, processes)]


async def run_windows(config: BenchConfig, rows: np.ndarray, model: str, ways: list[Way]) -> list[dict[str, Any]]:
    """Every way warmed (a JVM only reaches its speed once it has compiled its hot paths; a fresh TorchServe is
    ~1.5x slower), then scenario by scenario, every way in turn, so that neighbouring windows share the drifting
    load of the machine."""
    bench = Bench(config, rows, model)
    print(f"{model}: warm-up, c=64 single-row for {config.jvm_warmup_s:.0f} s per way", flush=True)
    for way in ways:
        await bench.warm(way.make(), BY_NAME["c64"], config.jvm_warmup_s)
    for scenario in SCENARIOS:
        for way in ways:
            if scenario in way.scenarios:
                await bench.measure(way.name, way.make(), scenario, way.processes, way.backend_calls)
    return bench.windows


def profile_under_load(config: BenchConfig, door: FrontDoor, way: Way, rows: np.ndarray, label: str, model: str
                       ) -> dict[str, Any]:
    """py-spy on the front door while `way` runs c=64 single-row requests."""
    seconds = max(10.0, config.seconds * 2)
    profile = profile_front_door(door, seconds, Path(config.out_dir) / f"{label}-{model}-frontdoor.pyspy.txt")
    if "process" not in profile:
        return profile
    profiled = BenchConfig(**{**asdict(config), "seconds": seconds, "max_attempts": 1})
    asyncio.run(Bench(profiled, rows, model).measure(f"{way.name} (profiled)", way.make(), BY_NAME["c64"],
                                                     way.processes))
    profile["process"].wait(60)
    if not Path(profile["file"]).exists():
        return {"error": "py-spy wrote nothing (permission to trace?)"}
    return summarize_profile(profile["file"])
