"""tritonclient ships its own generated `inference` protos; they cannot share a Python process with ours
(protobuf refuses the duplicate grpc_service.proto). These tests therefore run only when their folder is
named on the command line, in their own pytest process:

    .venv/bin/python -m pytest -q tests/client
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    asked = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    if any(path == HERE or HERE in path.parents for path in asked):
        return None
    return True
