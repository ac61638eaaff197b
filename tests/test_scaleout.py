"""Scale-out simulated on one machine: two front-door replicas (each with its own TorchServe), a client
balancing round-robin across them, and two batch shards on different replicas merged — equal to one replica."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from frontdoor_fixtures import GRADSERVE, FrontDoor, built_store, running_front_door

from client.grpc_client import Client


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FrontDoor, FrontDoor]]:
    store = built_store(tmp_path_factory).path
    with running_front_door(store, tmp_path_factory.mktemp("replica-a")) as a, \
            running_front_door(store, tmp_path_factory.mktemp("replica-b")) as b:
        yield a, b


def infer_requests(door: FrontDoor) -> int:
    text = httpx.get(f"{door.http_url}/metrics", headers=door.headers, timeout=10).text
    return sum(int(float(v)) for v in re.findall(
        r'^gradserve_requests_total\{[^}]*method="ModelInfer"[^}]*status="OK"[^}]*\} (\S+)$', text, re.MULTILINE))


def test_round_robin_client_spreads_calls_over_both_replicas(replicas: tuple[FrontDoor, FrontDoor]) -> None:
    a, b = replicas
    before = [infer_requests(a), infer_requests(b)]
    target = f"ipv4:{a.grpc_target},{b.grpc_target}"  # what dns:///<headless service> resolves to in Kubernetes
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)

    async def go() -> list[np.ndarray]:
        async with Client(target, token=a.token, load_balancing="round_robin") as client:
            return [(await client.infer("digits", x))["logits"] for _ in range(40)]

    answers = asyncio.run(go())
    assert all(np.array_equal(answers[0], got) for got in answers)
    served = [infer_requests(a) - before[0], infer_requests(b) - before[1]]
    assert sum(served) == 40 and min(served) >= 15, served


def test_two_shards_on_two_replicas_equal_one_replica(replicas: tuple[FrontDoor, FrontDoor], tmp_path: Path) -> None:
    a, b = replicas
    source = tmp_path / "rows.npy"
    np.save(source, np.random.default_rng(2).random((3000, 1, 8, 8), dtype=np.float32))

    def job(door: FrontDoor, output: Path, *extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(GRADSERVE), "batch", "--grpc", door.grpc_target, "--token", str(door.token),
                                 "--input", str(source), "--output", str(output), "--no-progress", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    parts = [tmp_path / "part-0.jsonl", tmp_path / "part-1.jsonl"]
    shards = [job(a, parts[0], "--shard", "0/2"), job(b, parts[1], "--shard", "1/2")]  # at once, like pods
    single = job(a, tmp_path / "single.jsonl")
    for process in [*shards, single]:
        assert process.wait(timeout=300) == 0, process.stderr.read() if process.stderr else ""
    merged = tmp_path / "merged.jsonl"
    subprocess.run([str(GRADSERVE), "batch", "merge", "--output", str(merged), *map(str, parts)], check=True)
    one, two = ([json.loads(line) for line in p.read_text().splitlines()] for p in (tmp_path / "single.jsonl", merged))
    assert len(one) == len(two) == 3000
    assert [(r["id"], r["label"]) for r in one] == [(r["id"], r["label"]) for r in two]
    assert np.abs(np.array([r["logits"] for r in one]) - np.array([r["logits"] for r in two])).max() <= 1e-5
