"""/docs in a real headless browser (Chromium): Swagger UI's script and styles come from gradserve itself, so
the page renders the API with no network beyond the server (an air-gapped cluster has no CDN). With a token
set, the page and the description it loads need the token like every route but health."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from common import free_port
from test_frontdoor_unit import fake_backend

from gradserve.config import build
from server.auth import Tokens
from server.config import ServeConfig
from server.rest import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def serve(config: ServeConfig) -> Iterator[str]:
    """The REST app (on a fake TorchServe: the docs need no model) on a free port, in a thread."""
    app = create_app(config, fake_backend(config)[0], Tokens(config.auth))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def open_docs() -> Iterator[str]:
    yield from serve(build(ServeConfig, {}, env={}))


def test_docs_render_in_a_headless_browser_with_local_assets(open_docs: str, tmp_path: Path) -> None:
    assert CHROMIUM, "Chromium is needed for this test: `make browser` (apt-get install chromium) installs it"
    page = httpx.get(f"{open_docs}/docs", timeout=10).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(a.startswith("/docs/assets/") or a == "/openapi.json" for a in assets), assets
    for asset in assets:
        assert httpx.get(f"{open_docs}{asset}", timeout=10).status_code == 200, asset
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--dump-dom",
         f"{open_docs}/docs"], capture_output=True, text=True, timeout=120).stdout
    # Swagger UI ran: it fetched /openapi.json and drew one block per operation.
    assert 'class="swagger-ui' in dom, dom[:2000]
    assert "/v2/models/{model}/infer" in dom and dom.count("opblock-summary-path") >= 6, dom[:2000]


def test_with_a_token_the_docs_need_it_and_health_does_not() -> None:
    config = build(ServeConfig, {"auth": {"token": "d0cs"}}, env={})
    for url in serve(config):
        for path in ("/docs", "/openapi.json", "/metrics", "/docs/assets/swagger-ui-bundle.js"):
            assert httpx.get(f"{url}{path}", timeout=10).status_code == 401, path
            assert httpx.get(f"{url}{path}", headers={"authorization": "Bearer d0cs"}, timeout=10).status_code == 200
        assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
