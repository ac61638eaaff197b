"""gradserve/http1.py, the lean HTTP/1.1 client of the front door (to TorchServe) and of the load generator,
against a real socket server. Its use by the TorchServe client is in test_frontdoor_unit.py."""

from __future__ import annotations

import asyncio

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
