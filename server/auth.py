"""Bearer-token authentication for every call but health, on gRPC (each service's methods check it) and HTTP
(the REST app's guard). Health stays open so that probes and load balancers need no secret; metrics and the API
docs need a token when one is set.

The valid tokens are `serve.auth.token` (or $GRADSERVE_TOKEN) and every line of `serve.auth.token_file`, which
is read again whenever it changes: a token is rotated without a restart by writing the new one beside the old,
letting clients switch, then dropping the old.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from pathlib import Path

import grpc

from gradserve.errors import UsageError
from server.config import Auth

log = logging.getLogger("gradserve.auth")

# Open without a token: on gRPC the standard health service and the protocol's ServerLive and ServerReady (which
# check nothing), on HTTP these paths.
OPEN_HTTP_PATHS = ("/v2/health/live", "/v2/health/ready")
MESSAGE = "missing or wrong credentials: send the header 'authorization: Bearer <token>'"


class Tokens:
    """The tokens that authorize a call right now."""

    def __init__(self, auth: Auth) -> None:
        self._auth = auth
        self._fixed = {auth.token} if auth.token else set()
        self._file = Path(auth.token_file) if auth.token_file else None
        self._seen: tuple[float, int] | None = None
        self._valid = sorted(f"Bearer {t}".encode() for t in self._fixed)  # until the file is read
        self.reload()

    @property
    def required(self) -> bool:
        return self._auth.mode != "none" and bool(self._valid or self._file)

    def authorized(self, header: str | None) -> bool:
        """True when no token is required, or `header` is "Bearer <a valid token>"."""
        if not self.required:
            return True
        if header is None:
            return False
        given = header.encode()
        return any(hmac.compare_digest(given, expected) for expected in self._valid)

    def reload(self) -> bool:
        """Read the token file again if it changed; True when the valid tokens changed."""
        tokens = set(self._fixed)
        if self._file is not None:
            try:
                stat = self._file.stat()
                if (stat.st_mtime, stat.st_size) == self._seen:
                    return False
                lines = self._file.read_text().splitlines()
                self._seen = (stat.st_mtime, stat.st_size)
            except OSError as e:
                log.error("cannot read the token file %s (%s); the tokens stay as they were", self._file, e)
                return False
            tokens |= {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
        valid = sorted(f"Bearer {t}".encode() for t in tokens)
        changed = valid != self._valid
        self._valid = valid
        if changed and self._seen is not None:
            log.info("tokens: %d valid (read from %s)", len(valid), self._file)
        return changed

    async def watch(self) -> None:
        """Follow the token file for as long as it runs."""
        while self._file is not None:
            await asyncio.sleep(self._auth.token_file_poll_s)
            self.reload()


def check_exposure(host: str, tokens: Tokens, auth: Auth) -> None:
    """Refuse to answer beyond this machine without authentication, unless it was turned off on purpose."""
    if auth.mode == "none":
        if not _loopback(host):
            log.warning("authentication is off (auth.mode: none) on %s: anyone who reaches it can call every "
                        "model; keep it behind something that authenticates (a mesh, a gateway)", host)
        return
    if not tokens.required and not _loopback(host):
        raise UsageError(f"refusing to listen on {host} without authentication: set a token (GRADSERVE_TOKEN, "
                         "serve.auth.token or serve.auth.token_file, a file a Secret can mount), or turn "
                         "authentication off on purpose with --no-auth (serve.auth.mode: none) when something "
                         "in front of gradserve authenticates")


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grpc_authorized(tokens: Tokens, context: grpc.aio.ServicerContext) -> bool:
    """Whether a gRPC call carries a valid token. Each service's methods ask it themselves (server/
    grpc_servicer.py, the reflection service in server/grpc_server.py): a grpc.aio server interceptor would
    cost every call, health included, 20-28% of the front door's unary throughput (measured at c=64 and 16)."""
    if not tokens.required:
        return True
    header = dict(context.invocation_metadata() or ()).get("authorization")
    return tokens.authorized(header if isinstance(header, str) else None)
