"""`gradserve run` (what `make run` calls): train and package the demo model when model_store/ has no
archive, then serve it in the foreground and print where to reach it, which checkpoint is served and why,
and one command each to try gRPC, REST and a batch job. Ctrl-C stops the front door and TorchServe."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import httpx

from gradserve.config import build, load_file
from server.config import ServeConfig
from server.main import serve
from server.torchserve import TorchServeError, check_java

log = logging.getLogger("gradserve.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="gradserve.yaml", help="gradserve.yaml with train/package/serve")
    parser.add_argument("--grpc-port", type=int, default=None)
    parser.add_argument("--http-port", type=int, default=None)
    parser.add_argument("--retrain", action="store_true", help="train and package again even if an archive exists")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_java()  # before minutes of training: TorchServe cannot start without Java 17
    except TorchServeError as e:
        raise SystemExit(f"gradserve run: {e}") from None
    sections = load_file(args.config)
    config = build(ServeConfig, sections.get("serve"), {"grpc_port": args.grpc_port, "http_port": args.http_port})
    store = Path(config.model_store)
    if args.retrain or not any(store.glob("*.mar")):
        build_demo_archive(sections)
    return asyncio.run(_serve_and_announce(config))


def build_demo_archive(sections: dict[str, Any]) -> Path:
    from training.config import TrainConfig
    from training.package import PackageConfig, package
    from training.train import train

    train_config = build(TrainConfig, sections.get("train"))
    print(f"no archive yet: training {train_config.name!r} (about 1-2 minutes on 2 cores)", flush=True)
    run_dir = train(train_config)
    archive = package(run_dir, build(PackageConfig, sections.get("package")), force=True)
    print(f"packaged {archive}", flush=True)
    return archive


async def _serve_and_announce(config: ServeConfig) -> int:
    server = asyncio.create_task(serve(config))
    if config.http_port > 0:
        ready = await _wait_ready(config, server)
        if ready:
            print(banner(config), flush=True)
    return await server


async def _wait_ready(config: ServeConfig, server: asyncio.Task[int]) -> bool:
    url = f"http://{_dial(config.host)}:{config.http_port}/v2/health/ready"
    async with httpx.AsyncClient(timeout=2.0) as client:
        while not server.done():
            try:
                if (await client.get(url)).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    return False


def _dial(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def banner(config: ServeConfig) -> str:
    host = _dial(config.host)
    lines = ["", "gradserve is ready.",
             f"  gRPC (Open Inference Protocol v2): {host}:{config.grpc_port}",
             f"  REST (the same over HTTP/JSON):    http://{host}:{config.http_port}/v2  "
             f"(OpenAPI: /docs, metrics: /metrics)"]
    for archive in sorted(Path(config.model_store).glob("*.mar")):
        manifest = _manifest(archive)
        if manifest is None or archive.stem != manifest["name"]:
            continue
        sel, record = manifest["selection"], manifest["selection"]["record"]
        lines += [f"  model {manifest['name']!r} v{manifest['version']}: checkpoint step {sel['step']}, "
                  f"gradient norm {record['grad_norm']:.3g}, validation loss {record['val_loss']:.4f} "
                  f"(untrained baseline {manifest['baseline_loss']:.4f}; rule satisfied: {sel['rule_satisfied']})",
                  f"    why: {sel['reason']}"]
        report = Path(manifest.get("training_config", {}).get("runs_dir", "runs")) / manifest["name"] / "report.png"
        if report.exists():
            lines.append(f"    training report: {report}")
    token = f" --token {config.token}" if config.token else ""
    auth = f" -H 'authorization: Bearer {config.token}'" if config.token else ""
    lines += ["", "Try it (from another terminal):",
              f"  gRPC:  .venv/bin/gradserve predict --grpc {host}:{config.grpc_port}{token} "
              "--model digits --input examples/digits.npy",
              f"  REST:  curl -s{auth} -H 'content-type: application/json' "
              f"-d @examples/infer.json http://{host}:{config.http_port}/v2/models/digits/infer",
              f"  batch: .venv/bin/gradserve batch --grpc {host}:{config.grpc_port}{token} --model digits "
              "--input examples/digits.jsonl --output /tmp/digits-predictions.jsonl",
              "Ctrl-C stops the front door and TorchServe.", ""]
    return "\n".join(lines)


def _manifest(archive: Path) -> dict[str, Any] | None:
    try:
        with zipfile.ZipFile(archive) as mar:
            return json.loads(mar.read("gradserve.json"))
    except (KeyError, OSError, zipfile.BadZipFile, ValueError):
        return None
