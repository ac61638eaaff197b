"""Turn the reliability suite's results (tests/reliability/results/<mode>/*.json) into the README's
"Reliability" section: one table row per scenario, its figures, and how to rerun it.

    .venv/bin/python tests/reliability/report.py --mode long > section.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

SCENARIOS = {  # scenario -> (what it does, what "failed as expected" means)
    "soak": "Soak: 32 concurrent gRPC clients, 4 rows each, across TorchServe key renewals (keys live 15 s)",
    "worker_killed": "kill -9 of TorchServe's python worker under load (16 clients, 10 s deadline, retry on "
                     "UNAVAILABLE)",
    "torchserve_killed": "kill -9 of TorchServe (Java) under load; the front door's supervisor restarts it",
    "slow_model": "A model slower (1 s) than the deadline (0.3 s), gRPC and REST; then a normal call",
    "full_queue": "Burst of 3 x max_in_flight (48) concurrent calls to the slow model",
    "fuzz_grpc": "hypothesis-generated ModelInfer: shapes, datatypes, raw sizes, typed contents, NaN/Inf, "
                 "empty/oversized, unknown names/versions/outputs",
    "fuzz_rest": "schemathesis: every operation of /openapi.json, positive and negative cases",
    "altered_weights": "Archive whose weights.pt was altered after packaging (TLS front door)",
    "torchserve_exposure": "TorchServe's sockets (psutil) and its model API: register calls without the key, with "
                           "a wrong one, of a URL, of a path outside the store",
    "weights_only": "Every torch.load in the repository (AST scan); planted pickles in checkpoint and weights.pt",
    "bad_archive": "An altered archive and a corrupt one dropped into the store beside a good model, under load",
    "version_roll": "Version 2.0 written into the store under 16 clients; 1.0 removed once 2.0 serves",
    "token_rotation": "A token rotated through the token file under load (new beside old, then old dropped)",
    "oversized_bodies": "4 clients sending 58 MiB REST bodies beside 16 normal clients",
    "exposure_refused": "`gradserve serve --host 0.0.0.0` without a token",
}


def figures(result: dict[str, Any]) -> str:
    parts = []
    for key in ("latency_ms", "answered_after_deadline_ms", "refused_in_ms"):
        if result.get(key):
            p = result[key]
            label = {"latency_ms": "latency", "answered_after_deadline_ms": "answered after deadline",
                     "refused_in_ms": "refused in"}[key]
            parts.append(f"{label} p50/p90/p99 {p['p50']:.0f}/{p['p90']:.0f}/{p['p99']:.0f} ms")
    if "throughput_rps" in result:
        parts.append(f"{result['throughput_rps']} req/s")
    if "back_in_s" in result:
        parts.append(f"ready again after {result['back_in_s']} s")
    if "next_request_answered_in_s" in result:
        parts.append(f"next call answered in {result['next_request_answered_in_s']} s (worker not wedged)")
    if "keys_renewed_under_load" in result:
        parts.append(f"keys renewed under load: {'yes' if result['keys_renewed_under_load'] else 'NO'}")
    if "memory" in result:
        growth = ", ".join(f"{role.split(' (')[0]} {m['growth_mib']:+.0f}" for role, m in result["memory"].items())
        parts.append(f"memory growth MiB: {growth}")
    if "listening_sockets" in result:
        parts.append(f"{len(result['listening_sockets'])} sockets, all on 127.0.0.1")
    if "refusal" in result:
        parts.append("log: " + result["refusal"].split(",")[0][:60] + "...")
    if "note" in result:
        parts.append(result["note"])
    return "; ".join(parts)


def section(mode: str) -> str:
    folder = RESULTS / mode
    lines = [
        "## Reliability",
        "",
        "A suite anyone can rerun proves how the served stack behaves under load, faults, bad input and attack. "
        "A short version of every scenario runs in `make test`; the long one (5 min soak, 3000 fuzzed gRPC "
        "requests, 4000 REST cases, 10 queue bursts) runs with:",
        "",
        "```",
        "make reliability   # GRADSERVE_RELIABILITY=long .venv/bin/python -m pytest tests/reliability -q",
        ".venv/bin/python tests/reliability/report.py --mode long   # this table, from tests/reliability/results/",
        "```",
        "",
        f"Figures of the `{mode}` run on a shared 2-core machine (timings are noisy; compare ratios). "
        "*Lost* counts requests that ended neither OK nor with the status the scenario expects: a wrong answer, "
        "a hang past the deadline, an INTERNAL error or a 5xx.",
        "",
        "| scenario | requests | OK | failed as expected | lost | figures |",
        "|---|---:|---:|---|---:|---|",
    ]
    for scenario, what in SCENARIOS.items():
        path = folder / f"{scenario}.json"
        if not path.exists():
            lines.append(f"| {what} | – | – | – | – | not run |")
            continue
        r = json.loads(path.read_text())
        expected = ", ".join(f"{k} {v}" for k, v in r.get("failed_as_expected", {}).items()) or "–"
        ok = r.get("ok", "–")
        lines.append(f"| {what} | {r['requests']} | {ok} | {expected} | {r['lost']} | {figures(r)} |")
    lines += [
        "",
        "Also covered elsewhere: every row of the error table from a real request, no token / wrong token on gRPC "
        "and REST, SIGTERM under load, a SIGKILLed front door takes its TorchServe down with it "
        "(tests/test_frontdoor_e2e.py); keys renewed behind the backend's back, and an archive whose worker "
        "cannot load failing TorchServe's start after 3 tries with the worker's reason instead of a 180 s wait "
        "(tests/test_torchserve_integration.py); TorchServe restarted during a batch job "
        "(tests/test_batch_served.py); tampered weights refused by the handler (tests/test_handler.py).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="long", choices=("short", "long"))
    parser.add_argument("--out", type=Path, help="write the section here instead of printing it")
    args = parser.parse_args()
    text = section(args.mode)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
