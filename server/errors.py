"""The front door's error vocabulary, mapped to gRPC and HTTP statuses in one table (ARCHITECTURE.md).

Code raises a domain error with a message that tells the caller what to do; the gRPC servicer and the REST
app ask `status_of` how to report any exception. Anything that is not a domain error is a bug: it becomes
INTERNAL with a generic message, and its trace goes to the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from handlers import codec

log = logging.getLogger(__name__)


class ServeError(Exception):
    """A failure the caller can act on; its message is shown to the caller."""


class InvalidInput(ServeError):
    """Shape, datatype, name, non-finite values, or too many rows."""


class ModelNotFound(ServeError):
    """Unknown model or version."""


class Unauthenticated(ServeError):
    """Missing or wrong credentials."""


class Unavailable(ServeError):
    """The model is not ready or the backend is down; retry later."""


class Overloaded(ServeError):
    """Too many requests in flight; retry with backoff."""


class MessageTooLarge(ServeError):
    """The request is larger than the configured maximum message size."""


class DeadlineExceeded(ServeError):
    """The caller's deadline passed before the answer came."""


@dataclass(frozen=True)
class Status:
    grpc: grpc.StatusCode
    http: int


TABLE: dict[type[ServeError], Status] = {
    InvalidInput: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    ModelNotFound: Status(grpc.StatusCode.NOT_FOUND, 404),
    Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401),
    Unavailable: Status(grpc.StatusCode.UNAVAILABLE, 503),
    Overloaded: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    MessageTooLarge: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
}
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500)
INTERNAL_MESSAGE = "internal error; the server log has the details"

# Error codes carried in handler payloads (handlers/codec.py) -> domain errors.
FROM_WIRE: dict[str, type[ServeError]] = {
    codec.INVALID_ARGUMENT: InvalidInput,
    codec.NOT_FOUND: ModelNotFound,
    codec.RESOURCE_EXHAUSTED: Overloaded,
    codec.UNAVAILABLE: Unavailable,
}


def from_wire(error: codec.WireError) -> Exception:
    """The domain error for an error a handler sent in its payload (INTERNAL and unknown codes: a bug)."""
    cls = FROM_WIRE.get(error.code)
    if cls is None:
        return RuntimeError(f"the model handler failed: {error.code}: {error.message}")
    return cls(error.message)


def status_of(exc: BaseException) -> tuple[Status, str]:
    """How to report `exc`: its status and the message the caller sees. Logs unknown errors with a trace."""
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls], str(exc)
    log.error("unhandled error", exc_info=exc)
    return INTERNAL, INTERNAL_MESSAGE
