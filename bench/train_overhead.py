"""Time per training iteration with gradient-norm monitoring against the same loop without it.

One process, one model, the same batches; the two variants alternate in interleaved blocks (order flipped each
repeat) so machine load hits both alike. Prints the ratio and writes bench/results/train_overhead.json.
Target: ratio <= 1.05.

    .venv/bin/python -m bench.train_overhead [--repeats 30] [--iters 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.data import load_digits_splits
from training.model import ModelConfig, build_model
from training.monitor import GradNormMonitor, global_grad_norm, grads_of

RESULTS = Path(__file__).resolve().parent / "results" / "train_overhead.json"


def run_block(model, optimizer, batches, monitor: GradNormMonitor | None) -> tuple[float, float]:
    """(wall, CPU) seconds per iteration over the batches; the monitored variant does what train.py does."""
    params = [p for p in model.parameters() if p.requires_grad]
    start, start_cpu = time.perf_counter(), time.process_time()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if monitor is None:
            loss.item()  # the loop logs the loss either way
        else:
            norm = global_grad_norm(grads_of(params))
            norm_value = norm.item()  # as in train.py: one wait, then the loss is ready
            monitor.observe(norm_value, loss.item())
        optimizer.step()
    return (time.perf_counter() - start) / len(batches), (time.process_time() - start_cpu) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--iters", type=int, default=40, help="iterations per block")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = load_digits_splits(0.15, 0.15, seed=0)
    model = build_model(ModelConfig()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.randperm(len(data.train))
    batches = [
        (data.train.x[order[i : i + args.batch_size]], data.train.y[order[i : i + args.batch_size]])
        for i in range(0, args.iters * args.batch_size, args.batch_size)
    ]
    monitor = GradNormMonitor(explosion_factor=10.0, vanishing_floor=1e-7, window=100)
    run_block(model, optimizer, batches, None)  # warm-up: allocator, kernels
    run_block(model, optimizer, batches, monitor)

    plain, monitored = [], []
    for r in range(args.repeats):
        variants = [(plain, None), (monitored, monitor)]
        for times, mon in variants if r % 2 == 0 else variants[::-1]:
            times.append(run_block(model, optimizer, batches, mon))

    def paired_ratio(i: int) -> float:
        # Each repeat pairs two adjacent blocks; the median of the paired ratios shrugs off load spikes.
        return statistics.median(m[i] / p[i] for m, p in zip(monitored, plain, strict=True))

    result = {
        "plain_ms_per_iter": 1000 * statistics.median(p[0] for p in plain),
        "monitored_ms_per_iter": 1000 * statistics.median(m[0] for m in monitored),
        "ratio": paired_ratio(0),  # wall clock
        "ratio_cpu_time": paired_ratio(1),  # CPU time of this process: what other load on the box cannot inflate
        "target": 1.05,
        "repeats": args.repeats,
        "iters_per_block": args.iters,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "model": ModelConfig().to_dict(),
    }
    print(
        f"per iteration: plain {result['plain_ms_per_iter']:.3f} ms, "
        f"monitored {result['monitored_ms_per_iter']:.3f} ms, ratio {result['ratio']:.4f} "
        f"(CPU time {result['ratio_cpu_time']:.4f}; target <= 1.05)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
