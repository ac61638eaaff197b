"""Two front doors that differ in settings, side by side on one model, windows interleaved between them.

    .venv/bin/python -m bench.frontdoor_ab --a event_loop=asyncio --b event_loop=uvloop
        [--model digits | --run runs/digits] [--rounds 3] [--seconds 3] [--loads 1x1,64x1,8x64] [--ways grpc,rest]
        [--warmup 10] [--a-code ../base] [--a-env NAME=VALUE ...] [--b-env NAME=VALUE ...]

The model is one of `gradserve bench`'s (trained first if its run has none), packaged for each side as the bench
packages the front door's archive, with the side's `package.` settings on top (`package.optimize=true`). Each side
is a `gradserve serve` (with its own TorchServe) whose `serve:` section is the defaults with the side's other
settings (dotted names for nested ones: `coalesce.max_delay_ms=1`; values are read as YAML). `--a-code DIR` runs
side a's front door from another checkout instead (`git worktree add ../base HEAD`, then proto/build.py run there
with this checkout's Python for its gRPC stubs), to compare code rather than settings; both archives are packaged by
this checkout, so the handler is the same on both sides (`bench.handler_throughput` compares handlers). `--a-env`
and `--b-env` add to a side's environment (`GRPC_EXPERIMENTS=`, `OMP_NUM_THREADS=1`, ...). Both run at
once, so that each pair of windows shares the machine's drifting load; which side goes first alternates by round.
Before the first round each side gets --warmup seconds of single rows at concurrency 64 (TorchServe's JVM compiles
its hot paths meanwhile: during its first minute its compiler took over half of its CPU at c=1). Per way
(gRPC ModelInfer, ModelStreamInfer, REST JSON; --ways) and load (--loads; by default 1 row at concurrency 1 and
64, 64 rows at concurrency 8): requests/s, p50, and the CPU per request of the front door (all its processes,
listen.processes) and of the whole server (with its TorchServe and workers), each round's, then the medians and
their ratios b / a. Writes bench/results/frontdoor_ab.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from bench.harness import package_settings
from bench.loadgen import OipGrpc, OipRest, OipStream, Target, closed_loop
from bench.measure import LOGITS, torchserve_role
from bench.models import ensure_trained, resolve
from bench.stacks import FrontDoor, running_front_door
from gradserve import config as gradserve_config
from gradserve.errors import UsageError
from server.models import read_archive
from training.package import PackageConfig, package

RESULTS = Path(__file__).resolve().parent / "results" / "frontdoor_ab.json"
LOADS = ((1, 1), (64, 1), (8, 64))  # (concurrency, rows per request)
WAYS = ("grpc", "stream", "rest")
FIGURES = ("req_s", "p50_ms", "door_cpu_ms", "server_cpu_ms")


def sections(settings: list[str]) -> dict[str, Any]:
    """{"serve": {...}, "package": {...}} from ["a.b=value", "package.optimize=true", ...]: names are serve settings
    unless they start with `package.`."""
    serve = settings_tree([s for s in settings if not s.startswith("package.")])
    package = settings_tree([s.removeprefix("package.") for s in settings if s.startswith("package.")])
    return {"serve": serve, "package": package}


def settings_tree(settings: list[str]) -> dict[str, Any]:
    """A nested mapping from ["a.b=value", ...]."""
    section: dict[str, Any] = {}
    for setting in settings:
        name, sep, value = setting.partition("=")
        if not sep:
            raise UsageError(f"{setting!r}: settings are name=value (e.g. event_loop=asyncio)")
        *parents, leaf = name.split(".")
        node = section
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    return section


def code_env(checkout: Path | None) -> dict[str, str]:
    """The environment that runs a front door from `checkout` (its modules first on the path); {} for this one."""
    if checkout is None:
        return {}
    checkout = checkout.resolve()
    if not (checkout / "server" / "main.py").is_file():
        raise UsageError(f"{checkout} is not a checkout of gradserve (no server/main.py)")
    if not (checkout / "server" / "generated").is_dir():
        raise UsageError(f"{checkout} has no gRPC stubs: run `{sys.executable} proto/build.py` in it")
    return {"PYTHONPATH": os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])}


def env_vars(settings: list[str]) -> dict[str, str]:
    """{"NAME": "value"} from ["NAME=value", ...] (an empty value is kept: set, but empty)."""
    if bad := [s for s in settings if "=" not in s or not s.partition("=")[0]]:
        raise UsageError(f"{bad}: environment variables are NAME=value (e.g. GRPC_EXPERIMENTS=)")
    return dict(s.partition("=")[::2] for s in settings)


def loads(text: str) -> tuple[tuple[int, int], ...]:
    """((concurrency, rows), ...) from "1x1,64x1,8x64"."""
    try:
        return tuple((int(c), int(r)) for c, r in (load.split("x") for load in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: loads are concurrency x rows, e.g. 1x1,64x1,8x64") from None


def ways(text: str) -> tuple[str, ...]:
    chosen = tuple(w.strip() for w in text.split(","))
    if not chosen or set(chosen) - set(WAYS):
        raise argparse.ArgumentTypeError(f"{text!r}: ways are some of {','.join(WAYS)}")
    return chosen


def target(door: FrontDoor, way: str, model: str) -> Target:
    if way == "grpc":
        return OipGrpc(door.grpc_target, None, model, LOGITS)
    if way == "stream":
        return OipStream(door.grpc_target, None, model, LOGITS)
    return OipRest(door.http_url, None, model, LOGITS)


async def window(door: FrontDoor, way: str, model: str, x: np.ndarray, concurrency: int,
                 seconds: float) -> dict[str, float]:
    t = target(door, way, model)
    senders = await t.open(x, concurrency)
    try:
        await closed_loop(senders, min(seconds, 0.5), len(x))  # connections open, the path warm
        door_process = psutil.Process(door.process.pid)
        descendants = door_process.children(recursive=True)  # TorchServe and its workers too
        doors = [door_process, *(p for p in descendants if role(p) == "frontdoor")]  # listen.processes
        server = [*doors, *(p for p in descendants if p not in doors)]
        before = [cpu_seconds(p) for p in server]
        measured = (await closed_loop(senders, seconds, len(x))).summary()
        spent = [cpu_seconds(p) - b for p, b in zip(server, before, strict=True)]
    finally:
        await t.close()
    if measured["errors"]:
        raise RuntimeError(f"{way}: {measured['errors']} errors, e.g. {measured['error_samples']}")
    requests = max(measured["requests"], 1)
    return {"req_s": measured["req_s"], "p50_ms": measured["p50_ms"],
            "door_cpu_ms": 1000 * sum(spent[:len(doors)]) / requests, "server_cpu_ms": 1000 * sum(spent) / requests}


def role(process: psutil.Process) -> str:
    try:
        return torchserve_role(process)
    except psutil.Error:
        return "gone"


def cpu_seconds(process: psutil.Process) -> float:
    try:
        return sum(process.cpu_times()[:2])
    except psutil.NoSuchProcess:  # a worker that ended during the window: its time is lost, not the window
        return 0.0


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for way in dict.fromkeys(r["way"] for r in results):
        for concurrency, rows in dict.fromkeys((r["concurrency"], r["rows"]) for r in results):
            cell = {side: [r for r in results if (r["way"], r["concurrency"], r["rows"], r["side"])
                           == (way, concurrency, rows, side)] for side in ("a", "b")}
            med = {side: {k: statistics.median(r[k] for r in rs) for k in FIGURES}
                   for side, rs in cell.items()}
            table.append({"way": way, "concurrency": concurrency, "rows": rows, "a": med["a"], "b": med["b"],
                          "req_s_b_over_a": med["b"]["req_s"] / med["a"]["req_s"],
                          "door_cpu_b_over_a": med["b"]["door_cpu_ms"] / med["a"]["door_cpu_ms"],
                          "server_cpu_b_over_a": med["b"]["server_cpu_ms"] / med["a"]["server_cpu_ms"]})
    return table


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="*", default=[], help="settings of side a, name=value ... (package.name=value)")
    parser.add_argument("--b", nargs="*", default=[], help="settings of side b, name=value ...")
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present)")
    parser.add_argument("--model", default="digits", help="a model of `gradserve bench` (default: digits)")
    parser.add_argument("--run", type=Path, default=None, help="a training run of the config's model instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring window per way, load and side")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of single rows at c=64 per side first")
    parser.add_argument("--loads", type=loads, default=LOADS,
                        help="concurrency x rows per request, comma-separated (default 1x1,64x1,8x64)")
    parser.add_argument("--ways", type=ways, default=WAYS, help="comma-separated of grpc,stream,rest (default all)")
    parser.add_argument("--a-code", type=Path, default=None,
                        help="a checkout of gradserve whose front door side a runs (default: this one)")
    parser.add_argument("--a-env", nargs="*", default=[], help="environment variables of side a, NAME=value ...")
    parser.add_argument("--b-env", nargs="*", default=[], help="environment variables of side b, NAME=value ...")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def print_medians(table: list[dict[str, Any]]) -> None:
    print(f"{'way':>6} {'c':>3} {'rows':>4} | {'a req/s':>8} {'b req/s':>8} {'b/a':>5} | {'a p50':>6} {'b p50':>6} | "
          f"{'door CPU ms a':>13} {'b':>6} {'b/a':>5} | {'server CPU ms a':>15} {'b':>6} {'b/a':>5}")
    for r in table:
        a, b = r["a"], r["b"]
        print(f"{r['way']:>6} {r['concurrency']:>3} {r['rows']:>4} | {a['req_s']:>8.0f} {b['req_s']:>8.0f} "
              f"{r['req_s_b_over_a']:>5.2f} | {a['p50_ms']:>6.2f} {b['p50_ms']:>6.2f} | {a['door_cpu_ms']:>13.3f} "
              f"{b['door_cpu_ms']:>6.3f} {r['door_cpu_b_over_a']:>5.2f} | {a['server_cpu_ms']:>15.3f} "
              f"{b['server_cpu_ms']:>6.3f} {r['server_cpu_b_over_a']:>5.2f}")


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    sides = {"a": sections(args.a), "b": sections(args.b)}
    given = {"a": env_vars(args.a_env), "b": env_vars(args.b_env)}
    env = {"a": {**code_env(args.a_code), **given["a"]}, "b": given["b"]}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gradserve-ab-") as tmp, contextlib.ExitStack() as stack:
        path = gradserve_config.default_path(args.config)
        (model,) = resolve([args.run.resolve().name if args.run else args.model], path, args.run, None)
        ensure_trained(model, None)
        settings = package_settings(model, gradserve_config.load(PackageConfig, path, "package"), 0)
        doors = {}
        for side, section in sides.items():
            mine = replace(settings, **section["package"], model_store=f"{tmp}/store-{side}")
            archive = package(model.run, mine, allow_fallback=True, force=True)
            config = Path(tmp, f"{side}.yaml")
            config.write_text(yaml.safe_dump({"serve": section["serve"]}))
            doors[side] = stack.enter_context(running_front_door(archive.parent, Path(tmp, side), config=str(config),
                                                                 env=env[side]))
        manifest = read_archive(archive).manifest
        assert manifest is not None
        name, spec = manifest.name, manifest.inputs[0]
        rng = np.random.default_rng(0)
        for side in ("a", "b"):  # TorchServe's JVM compiles its hot paths in its first minute: not in a window
            warm = rng.random((1, *spec.row_shape), dtype=np.float32)
            asyncio.run(window(doors[side], args.ways[0], name, warm, 64, args.warmup))
        for round_ in range(args.rounds):
            for way in args.ways:
                for concurrency, rows in args.loads:
                    x = rng.random((rows, *spec.row_shape), dtype=np.float32).round(3)
                    for side in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
                        figures = asyncio.run(window(doors[side], way, name, x, concurrency, args.seconds))
                        results.append({"round": round_, "way": way, "concurrency": concurrency, "rows": rows,
                                        "side": side, **figures})
                        print(f"round {round_} {way:6} c={concurrency:<3} rows={rows:<3} {side}: "
                              f"{figures['req_s']:8.0f} req/s  p50 {figures['p50_ms']:6.2f} ms  "
                              f"CPU ms/request: front door {figures['door_cpu_ms']:.3f}, "
                              f"server {figures['server_cpu_ms']:.3f}", flush=True)
    table = summarize(results)
    print(f"\nmedians of {args.rounds} rounds; a = {sides['a']}{f' from {args.a_code}' if args.a_code else ''}"
          f"{f' env {args.a_env}' if args.a_env else ''}, b = {sides['b']}{f' env {args.b_env}' if args.b_env else ''}")
    print_medians(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {psutil.cpu_count()} cores",
                                    "model": model.name, "sides": sides,
                                    "a_code": str(args.a_code) if args.a_code else None,
                                    "env": given, "rounds": results,
                                    "medians": table},
                                   indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
