"""Security: TorchServe answers only on loopback with its model API off; an archive whose weights were altered
is refused at load (the model never becomes ready, TorchServe's log says why); checkpoints and weights are
only unpickled with weights_only=True (a planted pickle runs nowhere); TLS on gRPC and HTTPS.

No token / wrong token on gRPC and REST: tests/test_frontdoor_e2e.py::test_missing_or_wrong_credentials (and
over TLS below). Key renewal under load: test_soak.py (the keys live 15 s in the suite's front door).
"""

from __future__ import annotations

import ast
import ipaddress
import json
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
import torch
from frontdoor_fixtures import TOKEN, FrontDoor, built_store

from bench.stacks import start_front_door
from server.generated import grpc_service_pb2 as pb
from server.generated import grpc_service_pb2_grpc as pb_grpc

from .conftest import archive_variant
from .test_faults import management

ROOT = Path(__file__).resolve().parents[2]
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REFUSAL = "refusing weights that were altered"

pytestmark = pytest.mark.slow


# --- TorchServe's sockets and APIs ----------------------------------------------------------------------------

def test_torchserve_listens_on_loopback_only_and_loads_only_what_the_front_door_asks(
        door: FrontDoor, record: Callable[[str, dict[str, Any]], None]) -> None:
    java = door.torchserve()
    assert java is not None
    listening = [c.laddr for p in [java, *java.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 4 and all(loopback(a.ip) for a in listening), listening  # 4: metrics API off
    workdir = door.workdir / "torchserve"
    port = management(door, "/models")["models"] and next(
        line.split(":")[-1] for line in (workdir / "config.properties").read_text().splitlines()
        if line.startswith("management_address"))
    # Its model API loads the store's archives for the front door, which alone holds the management key; and
    # no URL is allowed: nothing is ever downloaded, nothing outside the store is read.
    def register(url: str, key: str | None) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{port}/models", params={"url": url, "model_name": "other"},
                          headers={"authorization": f"Bearer {key}"} if key else {}, timeout=10)

    def with_the_key(url: str) -> httpx.Response:
        """With the management key of the moment: the suite's keys live 15 s, and one renewed between reading the
        key file and the request is refused for the key, not for what this test asks."""
        for _ in range(3):
            key = json.loads((workdir / "key_file.json").read_text())["management"]["key"]
            answer = register(url, key)
            if "Token Authorization failed" not in answer.text:
                break
            time.sleep(0.5)
        return answer

    refused = {"no key": register("digits.mar", None), "wrong key": register("digits.mar", "not-the-key"),
               "a URL": with_the_key("http://127.0.0.1:9/evil.mar"), "outside the store": with_the_key("../x.mar")}
    for why, answer in refused.items():
        assert answer.status_code in (400, 401, 403, 404), (why, answer.status_code, answer.text)
    assert "Token Authorization failed" in refused["no key"].text
    assert "allowed URL" in refused["a URL"].text and "Relative path" in refused["outside the store"].text
    record("torchserve_exposure", {"requests": len(refused), "lost": 0,
                                   "failed_as_expected": {f"register ({why}) HTTP {a.status_code}": 1
                                                          for why, a in refused.items()},
                                   "listening_sockets": sorted(f"{a.ip}:{a.port}" for a in listening)})


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # Java binds ::ffff:127.0.0.1


# --- planted pickles --------------------------------------------------------------------------------------------

class Planted:
    """Unpickling this creates `marker`: what a malicious checkpoint would do with a real payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_the_planted_pickle_is_live(tmp_path: Path) -> None:
    """The plant works when unpickled without weights_only: the tests below would notice it running."""
    import pickle

    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Planted(marker)))
    assert marker.exists()


@pytest.fixture
def planted_run(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the suite's run whose selected checkpoint and last.pt carry a planted object."""
    run = tmp_path / "runs" / "digits"
    shutil.copytree(built_store(tmp_path_factory).run, run)
    marker = tmp_path / "pwned"
    selection = json.loads((run / "selection.json").read_text())
    for relative in (selection["checkpoints"][selection["selection"]["index"]], "checkpoints/last.pt"):
        checkpoint = torch.load(run / relative, weights_only=True)
        checkpoint["state_dict"]["planted"] = Planted(marker)
        torch.save(checkpoint, run / relative)
    return run, marker


def test_resume_and_select_refuse_a_planted_checkpoint(planted_run: tuple[Path, Path]) -> None:
    from training import checkpoint

    run, marker = planted_run
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load(checkpoint.last_path(run))  # what `gradserve train --resume` and `gradserve select` call
    assert not marker.exists()


def test_packaging_refuses_a_planted_checkpoint(planted_run: tuple[Path, Path], tmp_path: Path) -> None:
    from training.package import PackageConfig, package

    run, marker = planted_run
    with pytest.raises(Exception, match="Weights only load failed"):
        package(run, PackageConfig(model_store=str(tmp_path / "store")))
    assert not marker.exists() and not (tmp_path / "store" / "digits.mar").exists()


def test_the_handler_refuses_planted_weights(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """An attacker who rewrites the whole archive (weights and the manifest's sha256) still runs no code."""
    from handlers.handler import GradserveHandler
    from handlers.local import context, unpack

    model_dir = unpack(built_store(tmp_path_factory).path / "digits.mar", tmp_path / "model")
    marker = tmp_path / "pwned"
    weights = torch.load(model_dir / "weights.pt", weights_only=True)
    torch.save({**weights, "planted": Planted(marker)}, model_dir / "weights.pt")
    manifest = json.loads((model_dir / "gradserve.json").read_text())
    import hashlib

    manifest["weights"]["sha256"] = hashlib.sha256((model_dir / "weights.pt").read_bytes()).hexdigest()
    (model_dir / "gradserve.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="Weights only load failed"):
        GradserveHandler().initialize(context(model_dir))
    assert not marker.exists()


def python_files() -> Iterator[Path]:
    """The repository's Python files: what git tracks, and new files it does not ignore (not the virtual
    environments, generated stubs, runs or TorchServe's unpacked archives)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file() and "generated" not in Path(name).parts:
            yield ROOT / name


def test_every_torch_load_passes_weights_only_true(record: Callable[[str, dict[str, Any]], None]) -> None:
    """torch.load(...) anywhere in the repository: weights_only=True, spelled out; np.load never allows pickles."""
    checked, offenders = 0, []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if node.func.attr == "load" and owner in ("torch", "torch.serialization"):
                checked += 1
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(where)
            if node.func.attr == "load" and owner in ("np", "numpy"):
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    offenders.append(where)
    record("weights_only", {"requests": checked, "failed_as_expected": {}, "lost": len(offenders),
                            "note": "torch.load calls in the repository, each with weights_only=True"})
    assert checked >= 3 and not offenders, offenders


# --- TLS, and an archive with altered weights -----------------------------------------------------------------

def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FrontDoor, Path]]:
    """A front door with TLS on, serving an archive of `digits` whose weights.pt was altered after packaging."""
    workdir = tmp_path_factory.mktemp("tls-door")
    store = workdir / "store"
    store.mkdir()
    archive_variant(built_store(tmp_path_factory).path / "digits.mar", store, "digits", alter_weights=True)
    cert, key = self_signed(workdir)
    door = start_front_door(store, workdir, TOKEN, "--tls-cert", str(cert), "--tls-key", str(key))
    door.http_url = door.http_url.replace("http://", "https://")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert door.process.poll() is None and time.monotonic() < deadline, door.log_tail()
            try:
                if httpx.get(f"{door.http_url}/v2/health/live", verify=ssl.create_default_context(cafile=cert),
                             timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield door, cert
    finally:
        door.stop(signal.SIGTERM)


def test_tls_on_grpc_and_https(tls_door: tuple[FrontDoor, Path]) -> None:
    door, cert = tls_door
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(door.grpc_target, credentials) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), timeout=10, metadata=AUTH).name == "digits"
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(door.grpc_target) as plain, pytest.raises(grpc.RpcError) as plaintext:
        pb_grpc.GRPCInferenceServiceStub(plain).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

    verify = ssl.create_default_context(cafile=cert)
    with httpx.Client(base_url=door.http_url, verify=verify, timeout=10) as https:
        assert https.get("/v2/models/digits", headers=door.headers).json()["name"] == "digits"
        assert https.get("/v2/models/digits").status_code == 401
    with pytest.raises(httpx.HTTPError):  # the certificate is not one the system trusts
        httpx.get(f"{door.http_url}/v2/health/live", timeout=10)
    plain_http = door.http_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain_http}/v2/health/live", timeout=10)


def test_altered_weights_are_refused_at_load(tls_door: tuple[FrontDoor, Path],
                                            record: Callable[[str, dict[str, Any]], None]) -> None:
    door, cert = tls_door
    model_log = door.workdir / "torchserve" / "logs" / "model_log.log"
    deadline = time.monotonic() + 120
    while not (model_log.exists() and REFUSAL in model_log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no refusal in {model_log}"
        time.sleep(0.5)
    refusal = next(line for line in model_log.read_text().splitlines() if REFUSAL in line)
    assert "sha256" in refusal

    verify = ssl.create_default_context(cafile=cert)
    with httpx.Client(base_url=door.http_url, verify=verify, headers=door.headers, timeout=10) as https:
        assert https.get("/v2/health/ready").status_code == 503
        assert https.get("/v2/models/digits/ready").json()["ready"] is False
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
        answer = https.post("/v2/models/digits/infer", json=body)
    assert answer.status_code == 503 and "not ready" in answer.json()["error"]
    with grpc.secure_channel(door.grpc_target, grpc.ssl_channel_credentials(cert.read_bytes())) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=10, metadata=AUTH).ready
    record("altered_weights", {"requests": 3, "failed_as_expected": {"HTTP 503": 2, "not ready": 1}, "lost": 0,
                               "refusal": refusal.split(" - ")[-1][:200]})
