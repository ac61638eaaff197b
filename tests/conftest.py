"""Fixtures every test area shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from common import free_port


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()
