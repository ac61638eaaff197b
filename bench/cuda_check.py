"""An archive's handler on a GPU against the same archive's handler on the CPU, in this process: do they answer
alike, and how fast is each. Needs a CUDA GPU (scripts/device_check.sh runs it on one).

    python -m bench.cuda_check --archive model_store/digits.mar [--archive ...] [--seconds 1] [--out F.json]

Per archive:
- agreement: the GPU handler's first output (logits, or a regression's prediction) for 257 rows (at most the
  archive's max_rows) against the CPU handler's, as the largest difference relative to the CPU answer's largest
  magnitude; and the same with TF32 allowed (what the handler's float32-only setting saves the contract).
- batch independence on the GPU: rows sent alone and in calls of 7 and 64 rows against the same rows in the
  257-row call (the handler's promise: a row's answer does not depend on what else is in its batch).
- rows/s of handle() on one request of R rows (up to the archive's max_rows), on the CPU (every core) and the
  GPU; on the GPU also the raw forward (the ceiling), the forward chunked at the archive's forward_rows as on
  the CPU (what one forward buys), and TF32 allowed. Wall time: every handle() ends with its answer copied to
  the host; the raw forward is synchronised.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.models import sample_rows
from handlers import codec
from handlers.handler import GradserveHandler
from handlers.local import context, unpack

ROWS = (1, 16, 64, 256, 1024)  # up to the archive's max_rows (1024 by default)
CHECK_ROWS = 257


def handler_on(model_dir: Path, gpu_id: int | None) -> GradserveHandler:
    handler = GradserveHandler()
    handler.initialize(context(model_dir, gpu_id=gpu_id))
    return handler


def answer(handler: GradserveHandler, rows: np.ndarray) -> np.ndarray:
    name = handler.manifest.outputs[0].name
    request = codec.encode({handler.manifest.input.name: rows}, [name])
    (raw,) = handler.handle([{"data": request}], context(Path(".")))
    message = codec.decode(raw)
    if message.error is not None:
        raise RuntimeError(f"the handler answered {message.error}")
    return message.tensors[name].astype(np.float64)


def tf32(allowed: bool) -> None:
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(a - reference).max() / max(np.abs(reference).max(), 1e-12))


def agreement(cpu: GradserveHandler, gpu: GradserveHandler) -> dict[str, float]:
    rows = sample_rows(cpu.manifest, min(CHECK_ROWS, cpu.manifest.max_rows), seed=1)
    reference = answer(cpu, rows)
    together = answer(gpu, rows)
    tf32(True)
    try:
        with_tf32 = answer(gpu, rows)
    finally:
        tf32(False)
    alone = np.concatenate([answer(gpu, rows[i : i + 1]) for i in range(16)])
    parts = np.concatenate([answer(gpu, rows[:7]), answer(gpu, rows[7:71])])
    return {"gpu_vs_cpu": relative(together, reference), "gpu_tf32_vs_cpu": relative(with_tf32, reference),
            "alone_vs_batch": relative(alone, together[:16]), "parts_vs_batch": relative(parts, together[:len(parts)])}


def rows_per_s(fn: Callable[[], Any], rows: int, seconds: float) -> float:
    for _ in range(3):
        fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        fn()
        calls += 1
    return rows * calls / elapsed


def throughput(cpu: GradserveHandler, gpu: GradserveHandler, seconds: float) -> list[dict[str, Any]]:
    table = []
    calls = context(Path("."))
    spec = cpu.manifest.input
    for n in [n for n in ROWS if n <= cpu.manifest.max_rows]:
        rows = sample_rows(cpu.manifest, n, seed=2)
        request = [{"data": codec.encode({spec.name: rows})}]
        for handler in (cpu, gpu):
            (message,) = map(codec.decode, handler.handle(request, calls))
            if message.error is not None:
                raise RuntimeError(f"{n} rows: the handler answered {message.error}")
        on_gpu = torch.from_numpy(rows).to(gpu.device)

        def raw(x: torch.Tensor = on_gpu) -> None:
            with torch.inference_mode():
                gpu.forward(gpu.transform.standardize(x))
            sync(gpu.device)

        def chunked(x: torch.Tensor = on_gpu, step: int = gpu.manifest.forward_rows or n) -> None:
            with torch.inference_mode():
                [gpu.forward(c) for c in gpu.transform.standardize(x).split(step)]
            sync(gpu.device)

        def tf32_handle(request: list = request) -> None:
            tf32(True)
            try:
                gpu.handle(request, calls)
            finally:
                tf32(False)

        row = {"rows": n,
               "cpu_handler": rows_per_s(lambda r=request: cpu.handle(r, calls), n, seconds),
               "gpu_handler": rows_per_s(lambda r=request: gpu.handle(r, calls), n, seconds),
               "gpu_raw_forward": rows_per_s(raw, n, seconds),
               "gpu_chunked_forward": rows_per_s(chunked, n, seconds),
               "gpu_handler_tf32": rows_per_s(tf32_handle, n, seconds)}
        table.append(row)
        print(f"  {n:5d} rows: " + "  ".join(f"{k} {v:,.0f}" for k, v in row.items() if k != "rows"), flush=True)
    return table


def check(archive: Path, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = unpack(archive, Path(tmp))
        cpu = handler_on(model_dir, None)
        gpu = handler_on(model_dir, 0)
        print(f"{archive.name}: forward_rows {cpu.manifest.forward_rows}, CPU forward {cpu.forward_kind}, "
              f"GPU forward {gpu.forward_kind}", flush=True)
        agree = agreement(cpu, gpu)
        print("  agreement: " + "  ".join(f"{k} {v:.2e}" for k, v in agree.items()), flush=True)
        return {"archive": archive.name, "forward_rows": cpu.manifest.forward_rows, "cpu_threads": cpu.threads.most,
                "agreement": agree, "throughput": throughput(cpu, gpu, seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, action="append", required=True, help="a .mar (repeatable)")
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per row count and path")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--dry-run", action="store_true",
                        help="without a GPU: both handlers on the CPU (checks this script, measures nothing)")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() or args.dry_run):
        parser.error("no CUDA GPU here: this check compares the GPU handler with the CPU's (--dry-run: the CPU "
                     "twice, to check the script)")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    results = {"gpu": gpu, "torch": torch.__version__, "cpu": platform.processor(), "cores": torch.get_num_threads(),
               "models": [check(a, args.seconds) for a in args.archive]}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
