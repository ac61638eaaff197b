"""`gradserve <stage>`: one console script, one subcommand per stage.

Each stage module exposes `add_arguments(parser)` and `main(args) -> int`; it is imported only when its
subcommand runs, so `gradserve batch` never pays for importing the training code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gradserve.errors import UsageError

STAGES: dict[str, tuple[str, str]] = {
    "train": ("training.cli", "train a model, watching the gradient norm; writes runs/<name>/"),
    "select": ("training.select_cli", "redo the checkpoint choice of a run with other rule parameters"),
    "package": ("training.package", "build model_store/<name>.mar from a run's selected checkpoint"),
    "study": ("training.study.cli", "measure the checkpoint rule against best-val, last and the oracle, per seed"),
    "serve": ("server.main", "start TorchServe on loopback and the gRPC/REST front door"),
    "run": ("gradserve.run", "train and package the demo if no archive exists, then serve it"),
    "predict": ("client.predict", "send an .npy/.json input over gRPC or REST and print predictions"),
    "batch": ("client.batch", "run a file of inputs through the front door (or --local)"),
    "bench": ("bench.harness", "measure every path side by side and write bench/results/"),
}
SERVING = ("serve", "run")  # stages that run a front door: gRPC's settings go in first (server/grpc_env.py)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        width = max(map(len, STAGES))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
        print("usage: gradserve <stage> [options]\n\nstages:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    stage, rest = argv[0], argv[1:]
    if stage in SERVING:
        from server import grpc_env  # imports nothing of gRPC's, which reads its settings once, when it loads

        grpc_env.apply()
    module = importlib.import_module(STAGES[stage][0])
    parser = argparse.ArgumentParser(prog=f"gradserve {stage}", description=STAGES[stage][1])
    module.add_arguments(parser)
    try:
        return int(module.main(parser.parse_intermixed_args(rest)) or 0)
    except UsageError as e:  # the one place a user's mistake becomes an exit code
        print(f"gradserve {stage}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
