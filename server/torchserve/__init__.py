"""TorchServe behind the front door, in one room: `process.py` starts and stops its Java process (through
`guard.py`, which takes it down with its launcher), `client.py` is the one client of its API (keys, readiness,
predictions, every match on its text), `supervisor.py` keeps it running, `log4j2.xml` is its logging.

Nothing is imported here: `python -m server.torchserve.guard` must start without loading gRPC."""
