"""A minimal HTTP/1.1 keep-alive client for the load generator: one connection per worker, a request written
as bytes prepared once, the answer read by its content-length (or its chunks). It spends a few tens of
microseconds of CPU per request where httpx spent milliseconds, so that a REST window measures the server.

    connection = Connection("127.0.0.1", 8000)
    request = post_request("127.0.0.1:8000", "/v2/models/digits/infer", body, "application/json")
    status, answer = await connection.send(request)
    connection.close()

Nothing else of HTTP is here: no redirects, no compression, no TLS, no pipelining.
"""

from __future__ import annotations

import asyncio
import re

HEADER_END = b"\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.I)
CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
LARGE = 1 << 16  # requests at least this long wait for the socket to take them (flow control)


class HttpError(Exception):
    """The server's answer is not HTTP/1.1 this client reads."""


def post_request(host: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
                 ) -> bytes:
    """A complete POST request, head and body, as bytes to write again and again on a keep-alive connection."""
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", f"content-type: {content_type}",
             f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection, opened on first use and again after the server closed it or a call failed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request/answer exchange; any failure closes the connection and raises."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        assert self.reader is not None
        try:
            self.writer.write(request)
            if len(request) >= LARGE:
                await self.writer.drain()
            head = await self.reader.readuntil(HEADER_END)
            status = int(head[9:12])
            if (length := CONTENT_LENGTH.search(head)) is not None:
                body = await self.reader.readexactly(int(length.group(1)))
            elif CHUNKED.search(head):
                body = await read_chunks(self.reader)
            else:
                raise HttpError(f"an answer with neither content-length nor chunks: {head[:200]!r}")
        except BaseException:
            self.close()
            raise
        if CLOSE.search(head):
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


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
