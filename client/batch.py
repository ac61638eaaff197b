"""`gradserve batch`: a whole file (or folder of images) through the front door, one prediction per row, in order.

Rows travel many per request with bounded concurrency. The job keeps each finished chunk in a work folder
beside the output (`<output>.work/`), written atomically, so a job killed at any moment and run again with
the same arguments finishes without losing or repeating a row. A request the server rejects as invalid is
split in halves until the bad rows stand alone; they go to the errors file, every other row succeeds.
UNAVAILABLE and DEADLINE_EXCEEDED are retried with backoff; missing credentials or an unknown model end the
job at once. `--shard i/N` takes the i-th of N slices; `gradserve batch merge` joins the parts in order.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client import batch_io
from client.batch_transport import FATAL, RETRYABLE, Answer, GrpcTransport, LocalTransport, Rejected, Transport
from gradserve import config as gradserve_config
from gradserve.config import ENV_TOKEN, env_field, path_field
from gradserve.errors import UsageError

EXHAUSTED_TRIES = 5  # RESOURCE_EXHAUSTED answers in a row before a group is split (0.1 + ... + 1.6 s)


@dataclass(frozen=True)
class BatchConfig:
    """One job; the `batch:` section of gradserve.yaml sets the defaults, flags the rest."""

    input: Path = path_field(dataclasses.MISSING)  # the file of rows
    output: Path = path_field(dataclasses.MISSING)
    model: str = "digits"
    grpc: str = "127.0.0.1:8001"
    token: str | None = env_field(ENV_TOKEN)
    local: Path | None = path_field()  # a .mar to run in-process instead of the server
    rows_per_request: int = 256
    concurrency: int = 4
    timeout_s: float = 30.0
    retry_for_s: float = 120.0  # how long UNAVAILABLE/DEADLINE_EXCEEDED are retried before rows fail
    shard: tuple[int, int] = (0, 1)  # (i, N): the i-th of N disjoint slices
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("input", "output", "local"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.rows_per_request < 1 or self.concurrency < 1:
            raise ValueError("rows_per_request and concurrency must be at least 1")
        i, n = self.shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n}: need 0 <= i < N")


@dataclass
class Chunk:
    index: int
    start: int  # row range [start, stop) within the shard
    stop: int


@dataclass
class Summary:
    rows: int
    done: int
    failed: int
    seconds: float
    output: str
    errors: str

    @property
    def rows_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


class JobFailed(UsageError):
    """The job cannot go on; finished chunks are kept for a rerun to resume."""

    exit_code = 1


def shard_range(total: int, shard: tuple[int, int]) -> tuple[int, int]:
    i, n = shard
    return total * i // n, total * (i + 1) // n


def errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors.jsonl")


def work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".work")


async def run_job(config: BatchConfig, transport: Transport) -> Summary:
    began = time.perf_counter()
    inputs = batch_io.read_inputs(config.input, transport.contract)
    start, stop = shard_range(len(inputs), config.shard)
    work = _prepare_work_dir(config, len(inputs))
    chunks = [Chunk(i, s, min(s + config.rows_per_request, stop - start))
              for i, s in enumerate(range(0, stop - start, config.rows_per_request))]
    todo = [c for c in chunks if not _chunk_file(work, c).exists()]
    bar = tqdm(total=stop - start, initial=(stop - start) - sum(c.stop - c.start for c in todo), unit="row",
               desc=f"batch {config.input.name}", disable=not config.progress, smoothing=0.1)
    limit = asyncio.Semaphore(config.concurrency)

    async def one(chunk: Chunk) -> None:
        async with limit:
            await _run_chunk(config, transport, inputs, start, chunk, work)
        bar.update(chunk.stop - chunk.start)

    try:
        await asyncio.gather(*(one(c) for c in todo))
    finally:
        bar.close()
    return _finish(config, transport, inputs, start, stop, chunks, work, time.perf_counter() - began)


def _prepare_work_dir(config: BatchConfig, total_rows: int) -> Path:
    """The folder that holds finished chunks; refuse to mix in chunks of a different job."""
    work = work_dir(config.output)
    stat = config.input.stat()
    identity = {"input": str(config.input.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "rows": total_rows, "rows_per_request": config.rows_per_request, "shard": list(config.shard),
                "model": config.model, "local": str(config.local) if config.local else None}
    job_file = work / "job.json"
    if job_file.exists():
        if json.loads(job_file.read_text()) != identity:
            raise JobFailed(f"{work} holds the progress of a different job (other input, shard, model or "
                            f"--rows-per-request); delete it to start over, or rerun with the same arguments")
        return work
    work.mkdir(parents=True, exist_ok=True)
    _atomic_write(job_file, json.dumps(identity, indent=2).encode())
    return work


def _chunk_file(work: Path, chunk: Chunk) -> Path:
    return work / f"chunk-{chunk.index:07d}.npz"


async def _run_chunk(config: BatchConfig, transport: Transport, inputs: batch_io.Inputs, offset: int,
                     chunk: Chunk, work: Path) -> None:
    first, last = offset + chunk.start, offset + chunk.stop
    n = last - first
    values: np.ndarray | None = None
    names = np.full(n, "", dtype=object)
    ok = np.zeros(n, dtype=bool)
    wanted = [i for i in range(first, last) if i not in inputs.bad]
    rows, unreadable = inputs.take(wanted)
    bad = {**{i: inputs.bad[i] for i in range(first, last) if i in inputs.bad}, **unreadable}
    errors = [{"id": inputs.ids[i], "status": "INVALID_ARGUMENT", "message": why} for i, why in sorted(bad.items())]
    readable = [k for k, i in enumerate(wanted) if i not in unreadable]  # positions in `rows`
    for positions, result in await _infer_isolating(config, transport, inputs.input_name, rows, readable):
        indices = np.asarray([wanted[k] for k in positions]) - first
        if isinstance(result, Rejected):
            errors += [{"id": inputs.ids[first + i], "status": result.status, "message": result.message}
                       for i in indices]
            continue
        if values is None:
            values = np.zeros((n, result.values.shape[1]), dtype=np.float32)
        values[indices] = result.values
        if result.names is not None:
            names[indices] = result.names
        ok[indices] = True
    if values is None:
        values = np.zeros((n, 0), dtype=np.float32)
    with batch_io.atomic_open(_chunk_file(work, chunk), "wb") as f:
        np.savez(f, values=values, names=names.astype(str), ok=ok, errors=np.array(json.dumps(errors)))


async def _infer_isolating(config: BatchConfig, transport: Transport, input_name: str, rows: np.ndarray,
                           positions: list[int]) -> list[tuple[list[int], Answer | Rejected]]:
    """Infer the rows at `positions`; when the server rejects the group as invalid, split it until bad rows
    stand alone."""
    if not positions:
        return []
    try:
        return [(positions, await _with_retries(config, transport, input_name, rows[positions]))]
    except Rejected as e:
        if e.status in FATAL:
            raise JobFailed(f"the server refused the job: {e}") from None
        if e.status in RETRYABLE:
            raise JobFailed(f"the server stayed unavailable for {config.retry_for_s:.0f} s ({e}); finished rows "
                            "are kept: run the same command again to resume") from None
        if len(positions) == 1 or e.status not in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
            return [(positions, e)]
    half = len(positions) // 2
    left = await _infer_isolating(config, transport, input_name, rows, positions[:half])
    return left + await _infer_isolating(config, transport, input_name, rows, positions[half:])


async def _with_retries(config: BatchConfig, transport: Transport, input_name: str, rows: np.ndarray) -> Answer:
    """UNAVAILABLE and DEADLINE_EXCEEDED are retried with backoff for `retry_for_s`; RESOURCE_EXHAUSTED (a busy
    server, or a request too large for it) a few times, then the caller splits the group."""
    deadline = time.monotonic() + config.retry_for_s
    delay, exhausted = 0.1, 0
    while True:
        try:
            return await transport.infer(input_name, rows)
        except Rejected as e:
            exhausted += e.status == "RESOURCE_EXHAUSTED"
            retry = e.status in RETRYABLE or (e.status == "RESOURCE_EXHAUSTED" and exhausted < EXHAUSTED_TRIES)
            if not retry or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _finish(config: BatchConfig, transport: Transport, inputs: batch_io.Inputs, start: int, stop: int,
            chunks: list[Chunk], work: Path, seconds: float) -> Summary:
    parts = [np.load(_chunk_file(work, c)) for c in chunks]
    width = max((p["values"].shape[1] for p in parts), default=0)
    values = np.zeros((stop - start, width), dtype=np.float32)
    names = np.full(stop - start, "", dtype=object)
    ok = np.zeros(stop - start, dtype=bool)
    errors: list[dict[str, str]] = []
    for chunk, part in zip(chunks, parts, strict=True):
        if part["values"].shape[1] == width:
            values[chunk.start:chunk.stop] = part["values"]
        names[chunk.start:chunk.stop] = part["names"]
        ok[chunk.start:chunk.stop] = part["ok"]
        errors += json.loads(str(part["errors"]))
    ids = inputs.ids[start:stop]
    batch_io.write_outputs(config.output, ids, values, names, ok, transport.contract.task)
    batch_io.write_errors(errors_path(config.output), errors)
    if config.shard[1] > 1:
        meta = {"shard": config.shard[0], "of": config.shard[1], "start": start, "stop": stop,
                "input": str(config.input)}
        _atomic_write(_shard_meta(config.output), json.dumps(meta).encode())
    shutil.rmtree(work)
    return Summary(stop - start, int(ok.sum()), int((~ok).sum()), seconds, str(config.output),
                   str(errors_path(config.output)))


def _shard_meta(output: Path) -> Path:
    return output.with_name(output.name + ".shard.json")


def _atomic_write(path: Path, data: bytes) -> None:
    with batch_io.atomic_open(path, "wb") as f:
        f.write(data)


def merge(parts: list[Path], output: Path) -> int:
    """Join shard outputs (and their errors files) in input order; refuse gaps and overlaps."""
    metas = sorted(((json.loads(_shard_meta(p).read_text()), p) for p in parts), key=lambda mp: mp[0]["start"])
    if not metas:
        raise UsageError("give the shard outputs to merge")
    expected_start = 0
    for meta, part in metas:
        if meta["start"] != expected_start:
            raise UsageError(f"{part} starts at row {meta['start']}, expected {expected_start}: a shard is "
                             "missing or repeated; merge every shard of the job once")
        expected_start = meta["stop"]
    if len(metas) != metas[0][0]["of"]:
        raise UsageError(f"got {len(metas)} shards of {metas[0][0]['of']}; merge every shard of the job")
    batch_io.check_suffix(output, batch_io.OUTPUT_SUFFIXES, "output file")
    with batch_io.atomic_open(output, "wb") as f:
        if output.suffix == ".npy":
            np.save(f, np.concatenate([np.load(p) for _, p in metas]))
        else:
            for _, p in metas:
                f.write(p.read_bytes())
    _atomic_write(errors_path(output), b"".join(errors_path(p).read_bytes() for _, p in metas))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["run", "merge"], default="run",
                        help="run a job (default) or merge shard outputs")
    parser.add_argument("parts", nargs="*", type=Path, help="merge: the shard outputs, in any order")
    parser.add_argument("--config", default=None, help="gradserve.yaml (default: ./gradserve.yaml if present); "
                        "its batch: section sets the defaults")
    parser.add_argument("--input", type=Path, help=".npy, .jsonl, .csv (rows) or a folder of image files")
    parser.add_argument("--output", type=Path, required=True, help=".jsonl (id, label, logits) or .npy (logits)")
    parser.add_argument("--model", help="the served model (default digits)")
    parser.add_argument("--grpc", help="the front door's gRPC address (default 127.0.0.1:8001)")
    parser.add_argument("--token", help="bearer token, if the front door wants one (default: $GRADSERVE_TOKEN, "
                                        "which `ps` does not show)")
    parser.add_argument("--local", type=Path, default=None, help="run this .mar in-process, no server")
    parser.add_argument("--rows-per-request", dest="rows_per_request", type=int, help="default 256")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 4)")
    parser.add_argument("--timeout", dest="timeout_s", type=float, help="deadline of each request, s (default 30)")
    parser.add_argument("--retry-for", dest="retry_for_s", type=float,
                        help="seconds to keep retrying UNAVAILABLE (default 120)")
    parser.add_argument("--shard", type=_parse_shard, help="i/N: process the i-th of N disjoint slices")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes i/N, e.g. 0/2; got {text!r}") from None
    return i, n


def main(args: argparse.Namespace) -> int:
    if args.action == "merge":
        return merge(args.parts, args.output)
    if args.input is None:
        raise UsageError("--input is required: the .npy, .jsonl or .csv file of rows, or a folder of images")
    names = ("input", "output", "model", "grpc", "token", "local", "rows_per_request", "concurrency", "timeout_s",
             "retry_for_s", "shard", "progress")
    config = gradserve_config.load(BatchConfig, gradserve_config.default_path(args.config), "batch",
                                   {name: getattr(args, name) for name in names})
    if not sys.stderr.isatty():
        config = replace(config, progress=False)
    batch_io.check_suffix(config.output, batch_io.OUTPUT_SUFFIXES, "output file")
    summary = asyncio.run(_main(config))
    print(json.dumps({**asdict(summary), "rows_per_s": round(summary.rows_per_s, 1)}))
    if summary.failed:
        print(f"{summary.failed} row(s) failed; see {summary.errors}", file=sys.stderr)
    return 1 if summary.failed else 0


async def _main(config: BatchConfig) -> Summary:
    if config.local is not None:
        transport: Transport = LocalTransport(config.local)
    else:
        client = GrpcTransport(config.grpc, config.model, config.token, config.timeout_s)
        try:
            transport = await client.connect()
        except Rejected as e:
            await client.close()
            raise JobFailed(f"cannot use model {config.model!r} at {config.grpc}: {e}") from None
    try:
        return await run_job(config, transport)
    finally:
        await transport.close()
