"""Runs TorchServe for its launcher and takes it down when the launcher goes, however the launcher ends.

    python -m server.torchserve.guard <command> [args...]

The launcher (server/torchserve/process.py) starts this guard in a new process group with a pipe as its
stdin, and the guard runs the command (`torchserve --foreground ...`) in that group: TorchServe's JVM and its model
workers end up there too. The launcher's end of the pipe closes when the launcher exits, SIGKILL included,
which no handler in the launcher could clean up after; the guard then stops the group (SIGTERM, SIGKILL
after a grace) instead of leaving TorchServe running on its ports. A launcher that stops TorchServe itself
signals the whole group; the guard ignores SIGTERM and exits with the command's status once it has ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 5.0


def _stop_group_when_stdin_closes(child: subprocess.Popen[bytes]) -> None:
    while os.read(sys.stdin.fileno(), 4096):
        pass
    if child.poll() is not None:
        return
    os.killpg(os.getpgrp(), signal.SIGTERM)  # the guard ignores it
    deadline = time.monotonic() + GRACE_S
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # whatever is left, the guard included


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m server.torchserve.guard <command> [args...]", file=sys.stderr)
        return 2
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # a group of its own, so that stopping "the group" never reaches whoever started it
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    # After the fork: an ignored signal stays ignored across exec, and the command must keep its defaults.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_stop_group_when_stdin_closes, args=(child,), daemon=True).start()
    code = child.wait()
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
