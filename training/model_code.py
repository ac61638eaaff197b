"""The model's code that travels in the archive: the built-in ConvNet's training/model.py, or the module (or
whole top-level package) of the user's factory, in its own layout at the archive's root, with a sha256 per file.

A user's top-level name that the serving environment already has (training, handlers, server, gradserve, ts,
torch, numpy, a standard-library module, ...) would be shadowed by, or shadow, that one in TorchServe's worker:
packaging refuses it, saying to rename it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import json
import shutil
import subprocess
import sys
from pathlib import Path

import training.model
from gradserve.errors import UsageError
from handlers.factory import BUILTIN, ModelSpec

RUN_CODE = "code"  # a run's copy of the user's model code as it was trained (training/train.py)

# Top-level names the archive itself uses: the handler's packages and the handler module.
RESERVED = {"training", "handlers", "handler", "server", "client", "gradserve", "bench", "ts", "model_archiver"}


def trained_code_dir(run: Path, config: dict[str, object]) -> str | None:
    """Where a run's model code is: its own copy, or (runs trained before it kept one) the checkpoint config's
    code_dir."""
    kept = Path(run) / RUN_CODE
    code_dir = config.get("code_dir")
    return str(kept) if kept.is_dir() else str(code_dir) if code_dir else None


def stage_model_code(spec: ModelSpec, code_dir: str | None, into: Path) -> dict[str, str]:
    """Copy the factory's code into `into` (the archive root's layout); its files' sha256, by relative path."""
    if spec.factory == BUILTIN:
        (into / "training").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(training.model.__file__, into / "training" / "model.py")
        (into / "training" / "__init__.py").write_text("")  # not the repo's: the archive carries the model only
        return {"training/model.py": sha256(into / "training" / "model.py")}
    top = spec.module.split(".")[0]
    source = _locate(top, code_dir, spec.factory)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix not in (".pyc", ".pyo"))
        base = source.parent
    else:
        files, base = [source], source.parent
    digests = {}
    for path in files:
        relative = path.relative_to(base)
        (into / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, into / relative)
        digests[relative.as_posix()] = sha256(into / relative)
    return digests


def _locate(top: str, code_dir: str | None, factory: str) -> Path:
    """The file or package folder of the user's top-level module `top`, refusing names the serving environment
    already has."""
    if top in RESERVED or top in sys.builtin_module_names or top in sys.stdlib_module_names:
        raise UsageError(f"the model factory {factory!r} lives in a module named {top!r}, which the serving "
                         "environment already has: rename your module (e.g. my_{top}.py) and its factory string")
    existing = importlib.machinery.PathFinder.find_spec(top, serving_path())
    if existing is not None:
        where = existing.origin or (list(existing.submodule_search_locations or []) or ["?"])[0]
        raise UsageError(f"your module {top!r} (factory {factory!r}) shadows {top!r} that the serving environment "
                         f"already has ({where}): rename your module and its factory string")
    found = importlib.machinery.PathFinder.find_spec(top, [code_dir] if code_dir else None)
    if found is None:
        raise UsageError(f"cannot find the module {top!r} of the model factory {factory!r} in {code_dir}; the "
                         "archive must carry it: keep it beside the config (train.code_dir)")
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    assert found.origin is not None
    return Path(found.origin)


@functools.cache
def serving_path() -> list[str]:
    """sys.path of a clean interpreter of this environment (`python -I`): what TorchServe's worker imports from,
    besides the archive (not what this process added for the user's code)."""
    done = subprocess.run([sys.executable, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
                          capture_output=True, text=True, timeout=60, check=True)
    return [p for p in json.loads(done.stdout) if p]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
