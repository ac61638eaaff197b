"""server/torchserve/guard.py on plain commands: it passes the command's status on, and when its stdin (the launcher's
pipe) closes it stops its whole process group, the command's children included."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

GUARD = [sys.executable, "-m", "server.torchserve.guard"]


def guarded(*command: str) -> int:
    """The guard's exit status, its pipe held open (as the launcher does) until it exits."""
    guard = subprocess.Popen([*GUARD, *command], stdin=subprocess.PIPE)
    try:
        return guard.wait(30)
    finally:
        assert guard.stdin is not None
        guard.stdin.close()


def test_the_guard_exits_with_the_commands_status() -> None:
    assert guarded("sh", "-c", "exit 3") == 3
    assert guarded("sh", "-c", "kill -9 $$") == 128 + signal.SIGKILL


def test_a_closed_pipe_stops_the_group_and_sigterm_is_left_to_the_command() -> None:
    guard = subprocess.Popen([*GUARD, "sh", "-c", "sleep 300 & sleep 300; wait"], stdin=subprocess.PIPE,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(psutil.Process(guard.pid).children(recursive=True)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = psutil.Process(guard.pid).children(recursive=True)
        assert len(tree) == 3, tree  # sh and its two sleeps
        guard.send_signal(signal.SIGTERM)  # ignored by the guard itself
        time.sleep(0.5)
        assert guard.poll() is None
        assert guard.stdin is not None
        guard.stdin.close()  # as if the launcher had died
        assert guard.wait(15) in (-signal.SIGKILL, 128 + signal.SIGTERM, 0)
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, alive
    finally:
        if guard.poll() is None:
            guard.kill()

