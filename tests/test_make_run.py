"""`make run` from a clean clone: trains and packages the demo, serves it, prints the endpoints and the
commands to try; the test runs those very commands (the README's), then Ctrl-C, and nothing is left."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from common import ROOT, free_port


def started(command: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`command` in a session of its own (as a terminal runs it), its output in `log_path`."""
    with log_path.open("w") as log:
        return subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def wait_for_banner(process: subprocess.Popen, log_path: Path, timeout: float) -> str:
    """The output once it says "gradserve is ready." (the process must not exit first)."""
    deadline = time.monotonic() + timeout
    while "gradserve is ready." not in log_path.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-5000:]
        time.sleep(0.5)
    text = log_path.read_text()
    assert "gradserve is ready." in text, text[-5000:]
    return text


def processes_under(folder: Path) -> list[psutil.Process]:
    """Processes whose working directory or command line is inside `folder`."""
    found = []
    for process in psutil.process_iter(["cwd", "cmdline"]):
        try:
            text = " ".join([process.info["cwd"] or "", *(process.info["cmdline"] or [])])
        except psutil.Error:
            continue
        if str(folder) in text and process.pid != os.getpid():
            found.append(process)
    return found


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to clone the repository")
def test_make_run_from_a_clean_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    (clone / ".venv").symlink_to(ROOT / ".venv")  # the environment `make test` already bootstrapped
    grpc_port, http_port = free_port(), free_port()
    log_path = tmp_path / "make-run.log"
    make = started(["make", "run", f"RUN_ARGS=--grpc-port {grpc_port} --http-port {http_port}"], log_path, clone)
    try:
        text = wait_for_banner(make, log_path, 600)
        assert (clone / "model_store" / "digits.mar").exists() and (clone / "runs" / "digits" / "report.png").exists()
        assert re.search(r"checkpoint step \d+, gradient norm [\d.e+-]+, validation loss [\d.]+ "
                         r"\(untrained baseline [\d.]+; rule satisfied: True\)", text), text[-3000:]
        assert f"127.0.0.1:{grpc_port}" in text and f"http://127.0.0.1:{http_port}/v2" in text

        commands = dict(re.findall(r"^  (gRPC|REST|batch):\s+(.+)$", text, flags=re.MULTILINE))
        assert set(commands) == {"gRPC", "REST", "batch"}, text[-3000:]
        outputs = {}
        for name, command in commands.items():
            done = subprocess.run(command, shell=True, cwd=clone, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{name}: {command}\n{done.stdout}\n{done.stderr}"
            outputs[name] = done.stdout
        assert '"model_name":"digits"' in outputs["REST"].replace(" ", "")
        assert Path("/tmp/digits-predictions.jsonl").read_text().count("\n") == 8
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C in the terminal signals the whole foreground group
        try:
            make.wait(timeout=90)
        finally:
            leftovers = processes_under(clone)
            for process in leftovers:
                process.kill()
    assert leftovers == [], [p.info for p in leftovers]


def test_without_java_make_run_stops_at_once_with_the_install_command(tmp_path: Path) -> None:
    venv_bin = ROOT / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}:/usr/local/sbin:/nonexistent", "JAVA_HOME": ""}
    started = time.monotonic()
    done = subprocess.run([str(venv_bin / "gradserve"), "run", "--config", str(ROOT / "gradserve.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "apt-get install openjdk-17-jre-headless" in done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "runs").exists()  # no training was started


def test_the_readme_shows_the_commands_make_run_prints_and_the_test_above_runs() -> None:
    from gradserve.run import banner
    from server.config import ServeConfig

    printed = re.findall(r"^  (?:gRPC|REST|batch):\s+(.+)$", banner(ServeConfig()), flags=re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    assert len(printed) == 3 and all(command in readme for command in printed), printed


def test_gradserve_run_requires_the_token_from_the_environment_and_never_prints_it(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """GRADSERVE_TOKEN alone turns authentication on for `gradserve run` (gRPC and REST), and neither the banner
    nor any log line shows it."""
    import grpc
    import httpx
    from frontdoor_fixtures import GRADSERVE, built_store

    from server.generated import grpc_service_pb2 as pb
    from server.generated import grpc_service_pb2_grpc as pb_grpc

    secret = "s3cret-token-never-printed"
    config = tmp_path / "gradserve.yaml"
    config.write_text(f"serve:\n  model_store: {built_store(tmp_path_factory).path}\n"
                      f"  torchserve: {{workdir: {tmp_path / 'torchserve'}}}\n")
    grpc_port, http_port = free_port(), free_port()
    log_path = tmp_path / "run.log"
    run = started([str(GRADSERVE), "run", "--config", str(config), "--grpc-port", str(grpc_port), "--http-port",
                   str(http_port)], log_path, tmp_path, env={**os.environ, "GRADSERVE_TOKEN": secret})
    try:
        assert "authentication: on, bearer token from $GRADSERVE_TOKEN" in wait_for_banner(run, log_path, 240)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), timeout=10,
                                        metadata=(("authorization", f"Bearer {secret}"),))
            assert answer.name == "digits"
        rest = f"http://127.0.0.1:{http_port}/v2/models/digits"
        assert httpx.get(rest, timeout=10).status_code == 401
        assert httpx.get(rest, headers={"authorization": f"Bearer {secret}"}, timeout=10).status_code == 200
    finally:
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=90)
    assert secret not in log_path.read_text()
