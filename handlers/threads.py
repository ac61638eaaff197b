"""How many torch threads a forward runs on: one for small calls, the worker's share of the cores for big ones.

Measured on 2 busy cores (`gradserve bench`, digits and the ResNet example, 1 vs 2 threads for every call):
two threads made single-row traffic at c=16 20-40% slower, because after each parallel region OpenMP's idle
thread spins for the next one on a core the front door, TorchServe and the clients need. So a call with fewer
than `parallel_rows` rows (coalesced single rows, small batches) runs on one thread, and a bigger one (a batch
job's request) on `handler.torch_threads` (0: the worker's share of the cores). Whether a big call gains from
more threads depends on the model: the ResNet example's 256-row requests ran 1.4x faster on 2 threads; for the
8x8 demo CNN, whose parallel regions are short, runs disagreed and its batch job ran half as fast. So the
packaged default is 1 and a heavy model sets 0. The handler and the bench's peers both use this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

PARALLEL_ROWS = 128  # default: calls with fewer rows run on one thread


@dataclass(frozen=True)
class Threads:
    most: int  # threads for a call of parallel_rows rows or more
    parallel_rows: int = PARALLEL_ROWS  # 0: every call runs on `most`

    @classmethod
    def from_config(cls, yaml_config: dict[str, Any]) -> Threads:
        """From model-config.yaml: workers of one model share the cores (workers x threads must not oversubscribe
        them; no maxWorkers: one worker per core); handler.torch_threads (0 or absent: that share) is capped by the
        share, handler.parallel_rows is the threshold."""
        cores = len(os.sched_getaffinity(0))
        share = max(1, cores // max(1, int(yaml_config.get("maxWorkers") or cores)))
        handler = yaml_config.get("handler") or {}
        wanted = handler.get("torch_threads") or share
        parallel_rows = handler.get("parallel_rows")
        return cls(min(int(wanted), share), PARALLEL_ROWS if parallel_rows is None else int(parallel_rows))

    def for_rows(self, rows: int) -> int:
        return 1 if rows < self.parallel_rows else self.most

    def use(self, rows: int) -> None:
        """Set torch's threads for a call of `rows` rows (only when they change: setting them is not free)."""
        wanted = self.for_rows(rows)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
