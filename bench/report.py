"""The bench's report: the issue's ratios, the markdown table, the plot, and the latest table in bench/README.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.measure import BENCH, SCENARIOS

# --- the report ---------------------------------------------------------------------------------------------------

SERVER_ROLES = ("frontdoor", "ts_launcher", "ts_java", "ts_worker")


def server_cpu_ms_per_request(window: dict[str, Any]) -> float:
    cpu = sum(window["cpu_s"].get(r, 0.0) for r in SERVER_ROLES)
    return 1000 * cpu / max(1, window["requests"])


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    w = {(x["target"], x["scenario"]): x for x in results["windows"]}
    ceiling = results["in_process"]["ceiling"]["rows_s"]
    fd64, ts64 = w[("frontdoor_grpc", "c64")], w[("torchserve_grpc", "c64")]
    fd1, ts1 = w[("frontdoor_grpc", "c1")], w[("torchserve_grpc_nobatch", "c1")]
    rest, grpc_ = w[("frontdoor_rest", "c16")], w[("frontdoor_grpc", "c16")]
    big = w[("frontdoor_grpc", "rows256_c8")]
    batch, raw = results["batch"], results["in_process"]["batch_raw"]
    rows = [
        ("front door gRPC / TorchServe direct gRPC (best setting), req/s, c=64 single-row",
         fd64["req_s"] / ts64["req_s"], ">= 1.5", fd64["req_s"] / ts64["req_s"] >= 1.5),
        ("p50 at c=1: front door gRPC - TorchServe direct gRPC batching off, ms",
         fd1["p50_ms"] - ts1["p50_ms"], "<= +0.5 ms", fd1["p50_ms"] - ts1["p50_ms"] <= 0.5),
        ("256-row requests c=8, front door gRPC rows/s / raw in-process ceiling",
         big["rows_s"] / ceiling, ">= 0.5", big["rows_s"] / ceiling >= 0.5),
        ("256-row requests c=8, TorchServe direct gRPC rows/s / raw ceiling (reference)",
         w[("torchserve_grpc", "rows256_c8")]["rows_s"] / ceiling, "", None),
        ("REST / gRPC server CPU per request, front door, c=16 single-row",
         server_cpu_ms_per_request(rest) / server_cpu_ms_per_request(grpc_), "<= 1.5",
         server_cpu_ms_per_request(rest) / server_cpu_ms_per_request(grpc_) <= 1.5),
        ("REST / gRPC req/s, front door, c=16 single-row (reference)", rest["req_s"] / grpc_["req_s"], "", None),
        ("batch job rows/s / raw forward on the same rows", batch["rows_s"] / raw["rows_s"], ">= 0.5",
         batch["rows_s"] / raw["rows_s"] >= 0.5),
    ]
    return [{"figure": f, "value": round(v, 3), "target": t, "met": m} for f, v, t, m in rows]


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"## `gradserve bench` {results['date']}", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
             f"Window {s['seconds']} s after {s['warmup_s']} s warm-up (and "
             f"{s.get('jvm_warmup_s', '0')} s at c=64 per way before the first window); "
             "front door's TorchServe archive: "
             f"{s['frontdoor_archive']}; archives' maxWorkers {s.get('max_workers', 1)} (one worker runs). "
             "CPU columns: ms of CPU per request of each process "
             "(loadgen = the client; server = front door + TorchServe java + its python worker); rows/backend call: "
             "rows per front-door call to TorchServe after coalescing; `other`: cores "
             "that processes not under test used during the window.", "",
             "| target | scenario | req/s | rows/s | p50 ms | p90 ms | p99 ms | errors | loadgen CPU | front door CPU "
             "| TS java CPU | TS worker CPU | server CPU | rows/backend call | other | tries |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in results["windows"]:
        per = {r: 1000 * v / max(1, w["requests"]) for r, v in w["cpu_s"].items()}
        lines.append(
            f"| {w['target']} | {w['scenario']} | {w['req_s']:.0f} | {w['rows_s']:.0f} | {w['p50_ms']:.2f} | "
            f"{w['p90_ms']:.2f} | {w['p99_ms']:.2f} | {w['errors']} | {per.get('loadgen', 0):.3f} | "
            f"{per.get('frontdoor', 0):.3f} | {per.get('ts_java', 0):.3f} | {per.get('ts_worker', 0):.3f} | "
            f"{server_cpu_ms_per_request(w):.3f} | {w.get('rows_per_backend_call') or ''} | {w['other_cores']:.2f} | "
            f"{w['attempts']} |")
    ip, b = results["in_process"], results["batch"]
    handler_table = ip["table"] if isinstance(ip["table"], dict) else ", ".join(
        f"{r['rows']} rows: raw {r['raw_rows_per_s']:.0f}, handler {r['handler_rows_per_s']:.0f}" for r in ip["table"])
    lines += ["", f"In-process (bench/handler_throughput.py, rows/s): {handler_table}  ",
        f"Raw ceiling: {ip['ceiling']['rows_s']:.0f} rows/s ({ip['ceiling']['threads']} thread(s), "
        f"{ip['ceiling']['rows_per_call']} rows per call).  ",
        f"Batch job: {b['rows']} rows at {b['rows_s']:.0f} rows/s ({b['failed']} failed; 256 rows per request, "
        f"4 in flight) vs raw forward on the same rows {ip['batch_raw']['rows_s']:.0f} rows/s; CPU s: {b['cpu_s']}.",
        "", "| figure | value | target | met |", "|---|---:|---|---|"]
    for r in results["ratios"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['figure']} | {r['value']:.3f} | {r['target']} | {met} |")
    if results.get("profile", {}).get("self"):
        p = results["profile"]
        lines += ["", f"Front door profile (py-spy, {p['samples']} samples, frontdoor_grpc c64), own time:", ""]
        lines += [f"- {share:.1%} {frame}" for frame, share in p["self"][:10]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(w["target"] for w in results["windows"]))
    w = {(x["target"], x["scenario"]): x for x in results["windows"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        xs = [j + i * width for j, s in enumerate(SCENARIOS) if (t, s.name) in w]
        left.bar(xs, [w[(t, s.name)]["rows_s"] for s in SCENARIOS if (t, s.name) in w], width, label=t)
    left.axhline(results["in_process"]["ceiling"]["rows_s"], color="k", ls="--", lw=1, label="raw ceiling")
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(SCENARIOS))], [s.name for s in SCENARIOS])
    left.set_yscale("log")
    left.set_ylabel("rows/s")
    left.legend(fontsize=7)
    left.set_title("throughput (single-row scenarios: rows/s = req/s)")
    c1 = [t for t in targets if (t, "c1") in w]
    right.bar(range(len(c1)), [w[(t, "c1")]["p50_ms"] for t in c1], label="p50")
    right.scatter(range(len(c1)), [w[(t, "c1")]["p99_ms"] for t in c1], color="r", zorder=3, label="p99")
    right.set_xticks(range(len(c1)), c1, rotation=60, ha="right", fontsize=7)
    right.set_ylabel("ms")
    right.set_title("latency at concurrency 1")
    right.legend(fontsize=7)
    fig.suptitle(f"gradserve bench {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(table: str, readme: Path = BENCH / "README.md") -> None:
    begin, end = "<!-- latest results: written by gradserve bench -->", "<!-- end of latest results -->"
    text = readme.read_text() if readme.exists() else "# bench\n"
    block = f"{begin}\n{table}{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    readme.write_text(text)
