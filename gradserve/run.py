"""`gradserve run` (what `make run` calls): train and package the demo model when the model store has no
archive of it, then serve the store (the demo, and any model packaged beside it) in the foreground and print
where to reach it, which checkpoint is served and why, and one command each to try gRPC, REST and a batch job.
Ctrl-C stops the front door and TorchServe.

The bearer token (serve.auth.token, or $GRADSERVE_TOKEN) is honoured and never printed: the banner says where
it came from, and its commands read it from the environment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gradserve import config as gradserve_config
from gradserve.errors import UsageError
from handlers.manifest import Manifest, ManifestError
from server.config import ServeConfig
from server.main import configure_logging, run, serve
from server.torchserve.process import TorchServeError, check_java


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="gradserve.yaml", help="gradserve.yaml with train/package/serve")
    parser.add_argument("--grpc-port", type=int, default=None)
    parser.add_argument("--http-port", type=int, default=None)
    parser.add_argument("--retrain", action="store_true", help="train and package again even if an archive exists")


def main(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        check_java()  # before minutes of training: TorchServe cannot start without Java 17
    except TorchServeError as e:
        raise UsageError(str(e)) from None
    config = gradserve_config.load(ServeConfig, args.config, "serve",
                                   {"listen.grpc_port": args.grpc_port, "listen.http_port": args.http_port})
    demo = gradserve_config.load_file(args.config).get("train", {}).get("name", "digits")
    if args.retrain or not (Path(config.model_store) / f"{demo}.mar").exists():
        build_demo_archive(args.config)
    return run(config, serve(config, on_ready=lambda: print(banner(config, demo), flush=True)))


def build_demo_archive(config_path: str) -> Path:
    from training.config import TrainConfig
    from training.package import PackageConfig, package
    from training.train import train

    train_config = gradserve_config.load(TrainConfig, config_path, "train")
    print(f"no archive yet: training {train_config.name!r} (about 1-2 minutes on 2 cores)", flush=True)
    run_dir = train(train_config)
    archive = package(run_dir, gradserve_config.load(PackageConfig, config_path, "package"), force=True)
    print(f"packaged {archive}", flush=True)
    return archive


def _dial(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def banner(config: ServeConfig, model: str = "digits") -> str:
    host, listen = _dial(config.listen.host), config.listen
    lines = ["", "gradserve is ready.",
             f"  gRPC (Open Inference Protocol v2): {host}:{listen.grpc_port}"]
    if listen.http_port > 0:
        lines.append(f"  REST (the same over HTTP/JSON):    http://{host}:{listen.http_port}/v2  "
                     "(OpenAPI: /docs, metrics: /metrics)")
    for archive in sorted(Path(config.model_store).glob("*.mar")):
        lines += _model_lines(archive)
    auth = ""
    if config.auth.token or config.auth.token_file:
        source = ("$GRADSERVE_TOKEN" if os.environ.get(gradserve_config.ENV_TOKEN) == config.auth.token
                  else "serve.auth.token in the config" if config.auth.token else config.auth.token_file)
        lines += [f"  authentication: on, bearer token from {source}; the commands below read $GRADSERVE_TOKEN"]
        auth = " -H \"authorization: Bearer $GRADSERVE_TOKEN\""
    # The sample inputs in examples/ are the digits demo's; another model gets its own rows.
    rows, infer_json, jsonl = ("examples/digits.npy", "examples/infer.json", "examples/digits.jsonl") \
        if model == "digits" else ("<rows.npy>", "<request.json>", "<rows.jsonl>")
    lines += ["", "Try it (from another terminal):",
              f"  gRPC:  .venv/bin/gradserve predict --grpc {host}:{listen.grpc_port} "
              f"--model {model} --input {rows}",
              f"  REST:  curl -s{auth} -H 'content-type: application/json' "
              f"-d @{infer_json} http://{host}:{listen.http_port}/v2/models/{model}/infer",
              f"  batch: .venv/bin/gradserve batch --grpc {host}:{listen.grpc_port} --model {model} "
              f"--input {jsonl} --output /tmp/{model}-predictions.jsonl",
              "Ctrl-C stops the front door and TorchServe.", ""]
    return "\n".join(lines)


def _model_lines(archive: Path) -> list[str]:
    """What the banner says of one archive: the checkpoint it serves and why (its latest copy only)."""
    try:
        manifest = Manifest.from_archive(archive)
    except ManifestError:
        return []
    if archive.stem != manifest.name:
        return []
    sel, record = manifest.selection, manifest.selection.get("record", {})
    lines = [f"  model {manifest.name!r} v{manifest.version}: checkpoint step {sel['step']}, "
             f"gradient norm {record['grad_norm']:.3g}, validation loss {record['val_loss']:.4f} "
             f"(untrained baseline {manifest.baseline_loss:.4f}; rule satisfied: {sel['rule_satisfied']})",
             f"    why: {sel['reason']}"]
    report = Path(manifest.training_config.get("runs_dir", "runs")) / manifest.name / "report.png"
    if report.exists():
        lines.append(f"    training report: {report}")
    return lines
