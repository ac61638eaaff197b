"""A minimal HTTP/1.1 keep-alive client: a request written as bytes (prepared once where it repeats), the answer
read by its content-length (or its chunks). It spends a few tens of microseconds of CPU per request where httpx
spends hundreds, which matters on the front door's hot path to TorchServe (server/torchserve/client.py) and in the
load generator (bench/loadgen.py), whose REST windows must measure the server, not the client.

    pool = Pool("127.0.0.1", 8080)                       # keep-alive connections, as many as calls in flight
    request = post_request("127.0.0.1:8080", "/predictions/digits", body, "application/octet-stream")
    status, answer = await pool.send(request)
    pool.close()

Nothing else of HTTP is here: no redirects, no compression, no TLS, no pipelining.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

HEADER_END = b"\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.I)
CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
LARGE = 1 << 16  # requests at least this long wait for the socket to take them (flow control)
LOST = (ConnectionError, asyncio.IncompleteReadError)  # how a connection the server closed fails


class HttpError(Exception):
    """The server's answer is not HTTP/1.1 this client reads."""


def request_head(method: str, host: str, path: str, length: int, content_type: str | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
    """The head of a request whose body is `length` bytes."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {length}",
             *([f"content-type: {content_type}"] if content_type else []),
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post_request(host: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
                 ) -> bytes:
    """A complete POST request, head and body, as bytes to write again and again on a keep-alive connection."""
    return request_head("POST", host, path, len(body), content_type, headers) + body


class Connection:
    """One keep-alive connection, opened on first use and again after the server closed it or a call failed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.answered = 0  # exchanges completed on the connection as it is now open

    async def send(self, request: bytes | Sequence[bytes]) -> tuple[int, bytes]:
        """(status, body) of one request/answer exchange; any failure closes the connection and raises.
        `request` may come in parts (a head and a body), written without joining them."""
        if self.writer is None or self.writer.is_closing():  # not yet open, or the server closed it while idle
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
            self.answered = 0
        reader, writer = self.reader, self.writer  # close() from elsewhere must not pull them from under this call
        assert reader is not None
        try:
            parts = [request] if isinstance(request, bytes) else request
            try:
                writer.writelines(parts)
            except RuntimeError as e:  # uvloop, on a transport closed under this call (asyncio drops the bytes)
                raise ConnectionResetError(f"the connection closed: {e}") from None
            if sum(len(p) for p in parts) >= LARGE:
                await writer.drain()
            head = await reader.readuntil(HEADER_END)
            status = int(head[9:12])
            if (length := CONTENT_LENGTH.search(head)) is not None:
                body = await reader.readexactly(int(length.group(1)))
            elif CHUNKED.search(head):
                body = await read_chunks(reader)
            else:
                raise HttpError(f"an answer with neither content-length nor chunks: {head[:200]!r}")
        except BaseException:
            self.close()
            raise
        self.answered += 1
        if CLOSE.search(head):
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Pool:
    """Keep-alive connections to one server, reused most recent first: as many open as calls were ever in flight
    at once (at most `max_idle` kept open while idle). `close` also ends the calls in flight (they raise)."""

    def __init__(self, host: str, port: int, max_idle: int = 64) -> None:
        self.host, self.port, self.max_idle = host, port, max_idle
        self.authority = f"{host}:{port}"
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._closed = False

    @classmethod
    def to(cls, url: str, max_idle: int = 64) -> Pool:
        """A pool to the server of `url` ("http://host:port", any path ignored)."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, max_idle)

    async def send(self, request: bytes | Sequence[bytes]) -> tuple[int, bytes]:
        """As Connection.send. A connection that had answered before and fails at once (the server closed it while
        it was idle) is tried once more, opened anew; `request` must be safe to repeat (the pool's users send
        reads, such as predictions)."""
        if self._closed:
            raise ConnectionResetError("the connection pool is closed")
        connection = self._idle.pop() if self._idle else Connection(self.host, self.port)
        self._busy.add(connection)
        try:
            reused = connection.answered > 0
            try:
                return await connection.send(request)
            except LOST:
                if not reused or self._closed:
                    raise
                return await connection.send(request)  # a new connection
        finally:
            self._busy.discard(connection)
            if connection.writer is not None and not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(connection)
            elif connection.writer is not None:
                connection.close()

    def close(self) -> None:
        self._closed = True
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()


async def read_chunks(reader: asyncio.StreamReader) -> bytes:
    """A chunked body (trailers, if any, skipped)."""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
