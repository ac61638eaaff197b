"""The bench's report: the issue's ratios per model, gradserve against the best peer, the markdown tables, the plot,
and the latest tables in bench/README.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import BENCH, SCENARIOS

SERVER_ROLES = ("frontdoor", "ts_launcher", "ts_java", "ts_worker", "peer")
Windows = dict[tuple[str, str, str], dict[str, Any]]  # (model, target, scenario) -> window


def server_cpu_ms_per_request(window: dict[str, Any]) -> float:
    cpu = sum(window["cpu_s"].get(r, 0.0) for r in SERVER_ROLES)
    return 1000 * cpu / max(1, window["requests"])


def by_key(results: dict[str, Any]) -> Windows:
    return {(x["model"], x["target"], x["scenario"]): x for x in results["windows"]}


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's figures for each model (front door against TorchServe direct and the raw forward)."""
    w = by_key(results)
    return [row for model in results["models"] for row in model_ratios(w, results, model)]


COMPUTE_BOUND_ROWS_S = 20_000  # a raw ceiling below this (over 50 us of forward per row): the forward dominates


def model_ratios(windows: Windows, results: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """The issue's figures that are not peer-relative (gradserve against the best peer: peer_ratios), and the
    c=1 targets against KServe, the unbatched in-process server, when it ran."""
    w = {(t, s): x for (m, t, s), x in windows.items() if m == model}
    ceiling = results["in_process"][model]["ceiling"]["rows_s"]
    rest, grpc_ = w[("frontdoor_rest", "c16")], w[("frontdoor_grpc", "c16")]
    big = w[("frontdoor_grpc", "rows256_c8")]
    batch, raw = results["batch"][model], results["in_process"][model]["batch_raw"]
    cpu_ratio = server_cpu_ms_per_request(rest) / server_cpu_ms_per_request(grpc_)
    compute_bound = ceiling < COMPUTE_BOUND_ROWS_S

    def best_way(scenario: str, what: str, target: float) -> tuple[str, float, str, bool | None]:
        """The front door's best way into `scenario` against the raw ceiling, held to `target` where the forward
        dominates."""
        way = max(("frontdoor_grpc", "frontdoor_stream", "frontdoor_rest"), key=lambda t: w[(t, scenario)]["rows_s"])
        value = w[(way, scenario)]["rows_s"] / ceiling
        figure = f"{what}, front door ({way.removeprefix('frontdoor_')}, the best way) rows/s / raw ceiling"
        if not compute_bound:
            return figure, value, "(forward too cheap to dominate)", None
        return figure, value, f">= {target}", value >= target

    rows = [
        best_way("c64", "single-row c=64", 0.8),
        best_way("rows64_c8", "64-row requests c=8", 0.9),
        ("256-row requests c=8, front door gRPC rows/s / raw in-process ceiling",
         big["rows_s"] / ceiling, ">= 0.6", big["rows_s"] / ceiling >= 0.6),
        ("256-row requests c=8, TorchServe direct gRPC rows/s / raw ceiling (reference)",
         w[("torchserve_grpc", "rows256_c8")]["rows_s"] / ceiling, "", None),
        *([("256-row requests c=8, front door gRPC rows/s / the eager model's ceiling (reference: the handler "
            "serves its compiled forward)", big["rows_s"] / eager["rows_s"], "", None)]
          if (eager := results["in_process"][model].get("eager_ceiling")) else []),
        ("REST / gRPC server CPU per request, front door, c=16 single-row", cpu_ratio, "<= 1.3", cpu_ratio <= 1.3),
        ("front door gRPC / TorchServe direct gRPC (batchSize 32, 5 ms), req/s, c=64 single-row (reference)",
         w[("frontdoor_grpc", "c64")]["req_s"] / w[("torchserve_grpc", "c64")]["req_s"], "", None),
        ("batch job rows/s / raw forward on the same rows (reference)", batch["rows_s"] / raw["rows_s"], "", None),
    ]
    rows += c1_targets(w)
    return [{"model": model, "figure": f, "value": round(v, 3), "target": t, "met": m} for f, v, t, m in rows]


def c1_targets(w: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, float, str, bool]]:
    """The c=1 targets against KServe, the unbatched in-process server, on each transport it ran: p50 at most 1 ms
    above its own, server CPU per request at most twice its own."""
    rows = []
    for way, name in (("grpc", "gRPC"), ("rest", "REST")):
        kserve, door = w.get((f"kserve_{way}", "c1")), w.get((f"frontdoor_{way}", "c1"))
        if kserve is None or door is None:
            continue
        gap = door["p50_ms"] - kserve["p50_ms"]
        cpu = server_cpu_ms_per_request(door) / server_cpu_ms_per_request(kserve)
        rows += [(f"p50 at c=1: front door {name} - KServe {name} (unbatched, in-process), ms", gap, "<= +1 ms",
                  gap <= 1),
                 (f"server CPU per request at c=1: front door {name} / KServe {name}", cpu, "<= 2", cpu <= 2)]
    return rows


# (figure, scenario, what, higher is better)
PEER_FIGURES = (
    ("req/s, single row, c=16", "c16", "req_s", True),
    ("req/s, single row, c=64", "c64", "req_s", True),
    ("p50 ms, single row, c=1", "c1", "p50_ms", False),
    ("server CPU ms/request, c=1", "c1", "server_cpu_ms", False),
    ("rows/s, 256-row requests, c=8", "rows256_c8", "rows_s", True),
)


def figure(window: dict[str, Any], what: str) -> float:
    return server_cpu_ms_per_request(window) if what == "server_cpu_ms" else float(window[what])


def peer_ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The front door against the best peer on the same transport, per model and figure: ratio = gradserve /
    best peer (ahead: above 1 for throughput, below 1 for latency and CPU)."""
    w, rows = by_key(results), []
    for model in results["models"]:
        peers = [p for p, found in results["peers"][model].items() if "error" not in found]
        for transport in ("grpc", "rest"):
            for name, scenario, what, higher in PEER_FIGURES:
                ours = w.get((model, f"frontdoor_{transport}", scenario))
                theirs = {p: figure(w[(model, f"{p}_{transport}", scenario)], what) for p in peers
                          if (model, f"{p}_{transport}", scenario) in w}
                if ours is None or not theirs:
                    continue
                best = (max if higher else min)(theirs, key=theirs.__getitem__)
                value = figure(ours, what)
                ratio = value / theirs[best] if theirs[best] else float("nan")
                rows.append({"model": model, "transport": transport, "figure": name, "gradserve": round(value, 3),
                             "best_peer": best, "peer": round(theirs[best], 3), "ratio": round(ratio, 3),
                             "ahead": bool(ratio > 1 if higher else ratio < 1), "peers": theirs})
    return rows


def loadgen_cpu(results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(model, client, ms of load-generator CPU per request) over the single-row windows of each client kind."""
    kinds = {"gRPC unary": ("_grpc", "_grpc_nobatch"), "gRPC stream": ("_stream",), "REST": ("_rest",)}
    found = []
    for model in results["models"]:
        for kind, endings in kinds.items():
            per = [1000 * w["cpu_s"].get("loadgen", 0.0) / max(1, w["requests"]) for w in results["windows"]
                   if w["model"] == model and w["rows"] == 1 and w["target"].endswith(endings)]
            if per:
                found.append((model, kind, float(np.mean(per))))
    return found


def header(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    peers = {name: found for by_peer in results["peers"].values() for name, found in by_peer.items()}
    lines = [f"## `gradserve bench` {results['date']}", "", f"Command: `{results['command']}`  ",
             f"Machine: {results['machine']}  ", f"Models: {', '.join(results['models'])}  ",
             f"Window {s['seconds']} s after {s['warmup_s']} s warm-up (and {s.get('jvm_warmup_s', '0')} s at c=64 "
             "per way before the first window); front door's TorchServe archive: "
             f"{s['frontdoor_archive']}; TorchServe workers per model: each model's line below. "
             "CPU columns: ms of CPU per request of each process (loadgen = the client; server = front door + "
             "TorchServe java + its python worker, or the peer's processes); rows/backend call: rows per front-door "
             "call to TorchServe after coalescing; `other`: cores that processes not under test used during the "
             "window.  "]
    for name, found in peers.items():
        server = next((f["server"] for by_peer in results["peers"].values() for p, f in by_peer.items()
                       if p == name and "server" in f), {})
        lines.append(f"Peer {name}: {found['what']} (says {server.get('name')} {server.get('version')})  ")
    lines += [f"Peer {name} **did not start** for {model}: {found['error'][:300]}  "
              for model, by_peer in results["peers"].items() for name, found in by_peer.items() if "error" in found]
    lines += [f"{line}  " for line in results.get("missing_peers", [])]
    return lines


def window_table(results: dict[str, Any]) -> list[str]:
    lines = ["", "| model | target | scenario | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors | loadgen CPU "
             "| front door CPU | TS java CPU | TS worker CPU | peer CPU | server CPU | rows/backend call | other "
             "| tries |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in results["windows"]:
        per = {r: 1000 * v / max(1, w["requests"]) for r, v in w["cpu_s"].items()}
        lines.append(
            f"| {w['model']} | {w['target']} | {w['scenario']} | {w['req_s']:.0f} | {w['rows_s']:.0f} | "
            f"{w['p50_ms']:.2f} | {w['p90_ms']:.2f} | {w['p99_ms']:.2f} | {w['errors']} | "
            f"{per.get('loadgen', 0):.3f} | {per.get('frontdoor', 0):.3f} | {per.get('ts_java', 0):.3f} | "
            f"{per.get('ts_worker', 0):.3f} | {per.get('peer', 0):.3f} | {server_cpu_ms_per_request(w):.3f} | "
            f"{w.get('rows_per_backend_call') or ''} | {w['other_cores']:.2f} | {w['attempts']} |")
    return lines


def in_process_lines(results: dict[str, Any]) -> list[str]:
    lines = [""]
    for model in results["models"]:
        ip, b = results["in_process"][model], results["batch"][model]
        handler = ip["table"] if isinstance(ip["table"], dict) else ", ".join(
            f"{r['rows']} rows: raw {r['raw_rows_per_s']:.0f}, handler {r['handler_rows_per_s']:.0f}"
            for r in ip["table"])
        served = ip.get("served")
        served = (f"Served by {served['workers']} TorchServe worker(s), torch_threads {served['torch_threads']} "
                  "(0: the worker's share of the cores).  ") if served else ""
        lines += [f"**{model}**. {served}In-process (bench/handler_throughput.py, rows/s): {handler}  ",
                  f"Raw ceiling: {ip['ceiling']['rows_s']:.0f} rows/s ({ip['ceiling']['threads']} thread(s), "
                  f"{ip['ceiling']['rows_per_call']} rows per call; forward {ip.get('forward', 'eager')}"
                  + (f"; the eager model's: {ip['eager_ceiling']['rows_s']:.0f}" if "eager_ceiling" in ip else "")
                  + ").  ",
                  f"Batch job: {b['rows']} rows at {b['rows_s']:.0f} rows/s ({b['failed']} failed; 256 rows per "
                  f"request, 4 in flight) vs raw forward on the same rows {ip['batch_raw']['rows_s']:.0f} rows/s; "
                  f"CPU s: {b['cpu_s']}.", ""]
    return lines


def ratio_tables(results: dict[str, Any]) -> list[str]:
    lines = ["Load generator CPU per request, ms (single-row windows, mean over the targets): " + "; ".join(
        f"{model} {kind} {ms:.3f}" for model, kind, ms in loadgen_cpu(results)) + ".", "",
        "| model | figure | value | target | met |", "|---|---|---:|---|---|"]
    for r in results["ratios"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['model']} | {r['figure']} | {r['value']:.3f} | {r['target']} | {met} |")
    if results.get("peer_ratios"):
        lines += ["", "gradserve's front door against the best peer on the same transport (ratio = gradserve / "
                  "best peer; ahead: above 1 for throughput, below 1 for latency and CPU):", "",
                  "| model | transport | figure | gradserve | best peer | peer | ratio | ahead |",
                  "|---|---|---|---:|---|---:|---:|---|"]
        for r in results["peer_ratios"]:
            lines.append(f"| {r['model']} | {r['transport']} | {r['figure']} | {r['gradserve']:.2f} | "
                         f"{r['best_peer']} | {r['peer']:.2f} | {r['ratio']:.3f} | "
                         f"{'yes' if r['ahead'] else '**no**'} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = header(results) + window_table(results) + in_process_lines(results) + ratio_tables(results)
    for model, p in results.get("profile", {}).items():
        if p.get("self"):
            lines += ["", f"{model}: front door profile (py-spy, {p['samples']} samples, frontdoor_grpc c64), "
                      "own time:", ""]
            lines += [f"- {share:.1%} {frame}" for frame, share in p["self"][:10]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Per model: rows/s of every target per scenario (log scale), and p50/p99 at concurrency 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(15, 4.5 * len(models)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    windows = by_key(results)
    for (left, right), model in zip(axes, models, strict=True):
        w = {(t, s): x for (m, t, s), x in windows.items() if m == model}
        targets = list(dict.fromkeys(t for t, _ in w))
        width, colours = 0.8 / len(targets), plt.get_cmap("tab20").colors
        for i, t in enumerate(targets):
            xs = [j + i * width for j, s in enumerate(SCENARIOS) if (t, s.name) in w]
            left.bar(xs, [w[(t, s.name)]["rows_s"] for s in SCENARIOS if (t, s.name) in w], width, label=t,
                     color=colours[i % len(colours)])
        left.axhline(results["in_process"][model]["ceiling"]["rows_s"], color="k", ls="--", lw=1, label="raw ceiling")
        left.set_xticks([j + 0.4 - width / 2 for j in range(len(SCENARIOS))], [s.name for s in SCENARIOS])
        left.set_yscale("log")
        left.set_ylabel("rows/s")
        left.legend(fontsize=6, ncol=2)
        left.set_title(f"{model}: throughput (single-row scenarios: rows/s = req/s)")
        c1 = [t for t in targets if (t, "c1") in w]
        right.bar(range(len(c1)), [w[(t, "c1")]["p50_ms"] for t in c1], label="p50")
        right.scatter(range(len(c1)), [w[(t, "c1")]["p99_ms"] for t in c1], color="r", zorder=3, label="p99")
        right.set_xticks(range(len(c1)), c1, rotation=60, ha="right", fontsize=6)
        right.set_ylabel("ms")
        right.set_title(f"{model}: latency at concurrency 1")
        right.legend(fontsize=7)
    fig.suptitle(f"gradserve bench {results['date']}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_readme(table: str, readme: Path = BENCH / "README.md") -> None:
    begin, end = "<!-- latest results: written by gradserve bench -->", "<!-- end of latest results -->"
    text = readme.read_text() if readme.exists() else "# bench\n"
    block = f"{begin}\n{table}{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    readme.write_text(text)
