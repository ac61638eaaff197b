"""Several front-door processes on one port (`--processes 2`, server/doors.py), on the real stack: connections
spread over both, each answers as the in-process model does, /metrics counts both, a region registered through
one is read through the other, a killed process is started again, and SIGTERM stops them all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import torch
from frontdoor_fixtures import TOKEN, FrontDoor, built_store, digits, running_front_door, selected_model

from client.grpc_client import decode, request
from server import grpc_env
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CONNECTIONS = 16  # on two listeners, all on one: 2 in 65536


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's store: a test here adds and removes versions."""
    copy = tmp_path_factory.mktemp("doors-store")
    for archive in built_store(tmp_path_factory).path.glob("*.mar"):
        shutil.copy(archive, copy)
    return copy


@pytest.fixture(scope="module")
def door(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    with running_front_door(store, tmp_path_factory.mktemp("doors"), TOKEN, "--processes", "2") as running:
        yield running


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return selected_model(built_store(tmp_path_factory).run)


def processes(door: FrontDoor) -> list[psutil.Process]:
    """The first front-door process, then the others it started."""
    first, others = psutil.Process(door.process.pid), []
    for child in first.children():
        with contextlib.suppress(psutil.Error):  # one just killed (a zombie) has no command line
            if "server.doors" in child.cmdline():
                others.append(child)
    return [first, *others]


def holding(door: FrontDoor, port: int) -> set[int]:
    """The front-door processes with an accepted connection on `port`."""
    return {p.pid for p in processes(door)
            if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in p.net_connections("tcp"))}


def channels(door: FrontDoor, n: int = CONNECTIONS) -> list[grpc.Channel]:
    # A local subchannel pool: each channel its own connection (by default equal channels share one).
    return [grpc.insecure_channel(door.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(n)]


def ok_infers(door: FrontDoor) -> int:
    text = httpx.get(f"{door.http_url}/metrics", headers=door.headers, timeout=10).text
    return sum(int(float(v)) for v in re.findall(
        r'^gradserve_requests_total\{[^}]*method="ModelInfer"[^}]*status="OK"[^}]*\} (\S+)$', text, re.MULTILINE))


def test_connections_spread_over_both_processes_and_each_answers_as_the_model(
        door: FrontDoor, reference: torch.nn.Module) -> None:
    x = digits()[0][:CONNECTIONS]
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    before = ok_infers(door)
    opened = channels(door)
    try:
        for i, channel in enumerate(opened):
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request("digits", x[i:i + 1]), metadata=AUTH)
            np.testing.assert_allclose(decode(answer)["logits"], expected[i:i + 1], atol=1e-5)
        assert len(processes(door)) == 2
        assert holding(door, int(door.grpc_target.rsplit(":", 1)[1])) == {p.pid for p in processes(door)}
    finally:
        for channel in opened:
            channel.close()
    http_port = int(door.http_url.rsplit(":", 1)[1])
    clients = [httpx.Client(base_url=door.http_url, headers=door.headers, timeout=30) for _ in range(CONNECTIONS)]
    try:
        for i, client in enumerate(clients):
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                "data": x[i].ravel().tolist()}]}
            answer = client.post("/v2/models/digits/infer", json=body)
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(answer.json()["outputs"][0]["data"], expected[i], atol=1e-5)
        assert holding(door, http_port) == {p.pid for p in processes(door)}
    finally:
        for client in clients:
            client.close()
    assert ok_infers(door) - before == 2 * CONNECTIONS  # /metrics, from either process, counts both


def engine_ticks(process: psutil.Process) -> int:
    """CPU ticks (user + system) of the process's threads that gRPC's EventEngine names `event_engine`."""
    ticks = 0
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that has just ended
            if (task / "comm").read_text().strip() == "event_engine":
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
    return ticks


def test_every_process_reads_its_grpc_connections_itself_not_on_event_engine_threads(door: FrontDoor) -> None:
    """server/grpc_env.py's settings reach both processes before gRPC loads: their connections are read by the
    thread that polls for grpc.aio, and gRPC's EventEngine threads do none of the requests' work (with gRPC's
    default experiments, GRPC_EXPERIMENTS set empty, they took 8% of a process's CPU under this load)."""
    assert grpc_env.VARIABLE not in os.environ, "the test's own GRPC_EXPERIMENTS would decide, not the front door"
    x = digits()[0][:1]
    engines = {p.pid: engine_ticks(p) for p in processes(door)}
    spent = {p.pid: sum(p.cpu_times()[:2]) for p in processes(door)}
    opened = channels(door)
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        for _ in range(150):
            calls = [stub.ModelInfer.future(request("digits", x), metadata=AUTH) for stub in stubs]
            assert all(call.result(timeout=30).outputs for call in calls)
    finally:
        for channel in opened:
            channel.close()
    for p in processes(door):
        busy = sum(p.cpu_times()[:2]) - spent[p.pid]
        assert busy > 0.15, f"process {p.pid} spent {busy:.2f} s: too little to tell"
        engine = (engine_ticks(p) - engines[p.pid]) / os.sysconf("SC_CLK_TCK")  # 0 here; 0.1 s of 1.3 without
        assert engine <= 0.02 + 0.03 * busy, f"EventEngine threads of {p.pid} spent {engine:.2f} s of {busy:.2f}"


def test_regions_registered_through_one_process_are_used_through_the_other(door: FrontDoor, tmp_path: Path) -> None:
    key = f"gradserve-test-doors-{tmp_path.name}"
    x = digits()[0][:1]
    shm, out = Path("/dev/shm") / key, Path("/dev/shm") / f"{key}-out"
    shm.write_bytes(x.tobytes())
    opened = channels(door)
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in opened]
        stubs[0].SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name="in", key=key, offset=0, byte_size=x.nbytes), metadata=AUTH)
        direct = decode(stubs[0].ModelInfer(request("digits", x), metadata=AUTH))["logits"]
        shared = request("digits", x)
        del shared.raw_input_contents[:]
        shared.inputs[0].parameters["shared_memory_region"].string_param = "in"
        shared.inputs[0].parameters["shared_memory_byte_size"].int64_param = x.nbytes
        for stub in stubs:
            np.testing.assert_allclose(decode(stub.ModelInfer(shared, metadata=AUTH))["logits"], direct, atol=1e-6)
        assert holding(door, int(door.grpc_target.rsplit(":", 1)[1])) == {p.pid for p in processes(door)}
        out.write_bytes(bytes(len(stubs) * direct.nbytes))
        stubs[-1].SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name="out", key=out.name, offset=0, byte_size=len(stubs) * direct.nbytes), metadata=AUTH)
        for i, stub in enumerate(stubs):  # each answer into its own slot, through whichever process holds it
            into = request("digits", x)
            logits = into.outputs.add(name="logits")
            logits.parameters["shared_memory_region"].string_param = "out"
            logits.parameters["shared_memory_byte_size"].int64_param = direct.nbytes
            logits.parameters["shared_memory_offset"].int64_param = i * direct.nbytes
            assert stub.ModelInfer(into, metadata=AUTH).raw_output_contents == [b""]
        written = np.frombuffer(out.read_bytes(), np.float32).reshape(len(stubs), *direct.shape[1:])
        np.testing.assert_allclose(written, np.repeat(direct, len(stubs), axis=0), atol=1e-6)
        stubs[-1].SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="in"), metadata=AUTH)
        for stub in stubs:
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(shared, metadata=AUTH)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no shared memory region 'in' is registered" in str(refused.value.details())
    finally:
        for channel in opened:
            channel.close()
        shm.unlink()
        out.unlink(missing_ok=True)


def as_version(archive: Path, into: Path, version: str) -> None:
    """A copy of `archive` that says it is `version` (gradserve's manifest and TorchServe's)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(into, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "gradserve.json":
                data = json.dumps({**json.loads(data), "version": version}).encode()
            elif item.filename == "MAR-INF/MANIFEST.json":
                mar = json.loads(data)
                mar["model"]["modelVersion"] = version
                data = json.dumps(mar).encode()
            dst.writestr(item, data)


def test_a_new_version_reaches_every_process_and_the_old_one_unloads_once_none_uses_it(
        door: FrontDoor, store: Path) -> None:
    x = digits()[0][:1]
    opened = channels(door)
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in opened]

    def versions_answering() -> set[str]:
        return {stub.ModelInfer(request("digits", x), metadata=AUTH).model_version for stub in stubs}

    try:
        assert versions_answering() == {"1.0"}
        as_version(store / "digits-1.0.mar", store / "digits-2.0.mar.part", "2.0")
        (store / "digits-2.0.mar.part").rename(store / "digits-2.0.mar")
        deadline = time.monotonic() + 90
        while versions_answering() != {"2.0"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert versions_answering() == {"2.0"}, door.log_tail()
        for old in ("digits-1.0.mar", "digits.mar"):
            (store / old).unlink()
        while "model digits version 1.0 unloaded" not in door.log_tail(300) and time.monotonic() < deadline:
            assert versions_answering() == {"2.0"}  # served throughout
        assert "model digits version 1.0 unloaded" in door.log_tail(300)
        one = request("digits", x)
        one.model_version = "1.0"
        for stub in stubs:
            with pytest.raises(grpc.RpcError) as gone:
                stub.ModelInfer(one, metadata=AUTH)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for channel in opened:
            channel.close()


def test_a_killed_process_is_started_again(door: FrontDoor) -> None:
    killed = processes(door)[1]
    killed.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p.pid for p in processes(door)[1:]] in ([], [killed.pid]):
        time.sleep(0.2)
    assert len(processes(door)) == 2 and processes(door)[1].pid != killed.pid, door.log_tail()
    assert "front-door process 2 ended (exit code -9); starting it again" in door.log_tail(200)
    while time.monotonic() < deadline and door.log_tail(200).count("front-door process 2 (pid") < 2:
        time.sleep(0.2)
    x = digits()[0][:1]
    opened = channels(door)
    try:
        for channel in opened:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request("digits", x), metadata=AUTH)
        assert holding(door, int(door.grpc_target.rsplit(":", 1)[1])) == {p.pid for p in processes(door)}
    finally:
        for channel in opened:
            channel.close()


def test_sighup_keeps_every_process_and_sigterm_stops_them(door: FrontDoor) -> None:
    """Last in this module: it ends the module's server."""
    every = processes(door)
    os.killpg(door.process.pid, signal.SIGHUP)  # the group, as a closed terminal sends it: the store is read again
    time.sleep(1)
    assert [p.pid for p in processes(door)] == [p.pid for p in every] and all(p.is_running() for p in every)
    assert door.stop(signal.SIGTERM, timeout=30) == 0, door.log_tail()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in every)
