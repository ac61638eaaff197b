"""How many rows a model forwards fastest at once, on this machine: `gradserve package` measures it and writes it
into the manifest (`forward_rows`), and the handler forwards larger batches in chunks of it. A CPU's caches make
a mid-sized batch faster per row than a large one (the demo CNN: 60k rows/s at 64 rows, 16k at 256, measured
here); one forward per chunk keeps every batch near that speed."""

from __future__ import annotations

import time

import torch
from torch import nn

SIZES = (1, 4, 16, 32, 64, 128, 256)
NEAR = 0.95  # a larger chunk within 5% of the fastest wins: fewer calls for the same speed


@torch.inference_mode()
def fastest_rows(model: nn.Module, in_shape: tuple[int, ...], threads: int, max_rows: int,
                 seconds: float = 0.15) -> int:
    """The batch size (of SIZES, up to max_rows) with the most rows per second of eval-mode forward, on
    `threads` torch threads (as a worker runs it), each timed for about `seconds` after a warm-up."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.eval()
    try:
        rates = {}
        for n in (s for s in SIZES if s <= max_rows):
            x = torch.rand((n, *in_shape))
            model(x)  # warm-up: first calls pay for allocation and kernel selection
            calls, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds or calls < 2:
                model(x)
                calls += 1
            rates[n] = calls * n / elapsed
    finally:
        torch.set_num_threads(before)
    best = max(rates.values())
    return max(n for n, rate in rates.items() if rate >= NEAR * best)
