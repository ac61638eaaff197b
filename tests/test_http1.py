"""gradserve/http1.py, the lean HTTP/1.1 client of the front door (to TorchServe) and of the load generator,
against a real socket server. Its use by the TorchServe client is in test_frontdoor_unit.py."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import uvloop

from gradserve import http1


async def _serve_and_send(answers: list[bytes], requests: int) -> tuple[list[tuple[int, bytes]], int, list[bytes]]:
    """A real socket server answering each request with the next of `answers` (closing the connection after one
    that says so); what the client got, how many connections it opened, and what the server read."""
    connections, seen = 0, []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                seen.append(head + await reader.readexactly(length))
                answer = answers[len(seen) - 1]
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    break
        except asyncio.IncompleteReadError:
            pass  # the client closed the connection
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = http1.Connection("127.0.0.1", port)
    request = http1.post_request(f"127.0.0.1:{port}", "/v2/models/m/infer", b'{"x":1}', "application/json",
                                 {"authorization": "Bearer t"})
    got = [await connection.send(request) for _ in range(requests)]
    connection.close()
    server.close()
    await server.wait_closed()
    return got, connections, seen


def test_http1_client_reads_lengths_and_chunks_and_reconnects_after_close() -> None:
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
               b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\nConnection: close\r\n\r\nno",
               b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]
    got, connections, seen = asyncio.run(_serve_and_send(answers, 4))
    assert got == [(200, b"hello"), (200, b"abcde"), (400, b"no"), (200, b"")]
    assert connections == 2  # keep-alive until the server said close
    assert all(s.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n") and s.endswith(b'\r\n\r\n{"x":1}') for s in seen)
    assert b"authorization: Bearer t\r\n" in seen[0] and b"content-length: 7\r\n" in seen[0]


async def _after_the_server_closed(gone: bool) -> tuple[tuple[int, bytes], BaseException | tuple[int, bytes]]:
    """One answer, then the server resets the connection without a word (as a killed TorchServe's sockets do);
    `gone`: it stops listening too. The pool's first answer, and what its second call got or raised."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # a reset, not a polite close: what a killed process's socket sends when data was left unread
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = http1.Pool.to(f"http://127.0.0.1:{port}/ignored")  # as the front door makes its pools
    assert (pool.authority, pool.max_idle) == (f"127.0.0.1:{port}", 64)
    request = http1.post_request(f"127.0.0.1:{port}", "/predictions/m", b"x", "application/octet-stream")
    first = await pool.send(request)
    await asyncio.sleep(0.2)  # the close reaches the client's idle connection
    if gone:
        server.close()
        await server.wait_closed()
    try:
        second: BaseException | tuple[int, bytes] = await pool.send(request)
    except Exception as e:  # noqa: BLE001 - what it raised is the point
        second = e
    pool.close()
    server.close()
    return first, second


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_connection_the_server_closed_is_reopened_or_fails_as_lost_on_either_loop(loop: str) -> None:
    """On uvloop, writing to a transport the server closed raised RuntimeError, which the TorchServe client took
    for a bug (INTERNAL) instead of the model server going away (UNAVAILABLE, retried by batch jobs)."""
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    for gone in (False, True):
        with asyncio.Runner(loop_factory=factory) as runner:
            first, second = runner.run(_after_the_server_closed(gone))
        assert first == (200, b"ok")
        if gone:
            assert isinstance(second, OSError | asyncio.IncompleteReadError), repr(second)
        else:
            assert second == (200, b"ok"), repr(second)
