"""Free TCP ports on a local address, for servers that must not collide (tests, bench, DDP's rendezvous)."""

from __future__ import annotations

import socket


def free_ports(host: str = "127.0.0.1", count: int = 1) -> list[int]:
    """`count` distinct ports free right now: every socket stays bound until all ports are known."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host, 1)[0]
