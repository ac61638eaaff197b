"""An inference request's JSON read by simdjson, each floating-point input's `data` straight into an array.

A JSON request of 256 images of 3x32x32 is 7.4 MiB of text and 786,432 numbers. Parsed into Python values first
(pydantic_core) and then into an array (numpy), it cost the front door 46 ms; here simdjson parses the text and
copies each FP16/FP32/FP64 input's numbers, nested or flat, into a float64 buffer without making a Python object
per number: 12 ms (`python -m bench.rest_parse`). Everything else in the request is small and becomes plain
Python values, so the caller checks it as before.

`parse` returns None for whatever it does not take (a body that is not a JSON object, JSON's common extensions
NaN and Infinity, a number out of range, anything invalid): the general parser then reads it, and its answer
or error is the same as without this module, but for two things: nested data is flattened in row-major order
whatever its nesting (ragged lists included, which numpy refuses), only its element count being checked against
the shape, by the caller; and of a key given twice in one object the first counts (the general parser: the last).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import simdjson

FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
# A parser keeps about three times the largest text it parsed (its tape and strings), and a fresh one costs that
# much in first-touched memory on every call (8 of the 20 ms of an 8 MiB text): one parser is kept for texts up to
# this size, used by one call at a time; bigger texts, and calls while it is busy, get a parser of their own.
SHARED_PARSER_BYTES = 8 << 20
_shared = simdjson.Parser()
_shared_lock = threading.Lock()


def parse(text: bytes) -> dict[str, Any] | None:
    """The request as plain values, floating-point inputs' data as flat float64 arrays; None: not taken here."""
    global _shared
    if len(text) <= SHARED_PARSER_BYTES and _shared_lock.acquire(blocking=False):
        try:
            request = _parse(_shared, text)
            if request is None:  # a value of this parse may outlive it in a traceback: the next call starts afresh
                _shared = simdjson.Parser()
            return request
        finally:
            _shared_lock.release()
    return _parse(simdjson.Parser(), text)


def _parse(parser: simdjson.Parser, text: bytes) -> dict[str, Any] | None:
    try:
        document = parser.parse(text)
        if not isinstance(document, simdjson.Object):
            return None
        # keys, then each value by its key: items() would turn the whole data array into Python values
        return {key: _inputs(document[key]) if key == "inputs" else _plain(document[key]) for key in document}
    except Exception:  # noqa: BLE001 - invalid JSON, NaN, too deep, not UTF-8, a key simdjson cannot look up
        return None  # (one with a NUL character), anything else: the general parser reads it and says what is wrong


def _inputs(entries: Any) -> Any:
    if not isinstance(entries, simdjson.Array):
        return _plain(entries)
    return [_input(entry) for entry in entries]


def _input(entry: Any) -> Any:
    if not isinstance(entry, simdjson.Object):
        return _plain(entry)
    floats = entry.get("datatype") in FLOAT_DATATYPES
    return {key: _numbers(entry[key]) if key == "data" and floats else _plain(entry[key]) for key in entry}


def _numbers(data: Any) -> Any:
    """A numeric array, nested or not, as a flat float64 array; anything else (strings, null, ...) as values."""
    if isinstance(data, simdjson.Array):
        try:
            return np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
        except TypeError:  # an element that is not a number: the caller's checks name it
            pass
    return _plain(data)


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value
