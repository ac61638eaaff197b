"""`gradserve package` proves an archive works before it writes it: in a clean interpreter (`python -I`: no
PYTHONPATH, no user site, no current folder; only the unpacked archive and the serving environment on the path),
as TorchServe's worker would, it imports the handler and the model's factory, rebuilds the model, loads the
weights strictly with weights_only=True, switches to eval and answers one batch of the declared input with the
declared outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gradserve.errors import UsageError

# Runs in the clean interpreter, the unpacked archive's folder as argv[1]; prints one JSON line.
CHECK = r"""
import json, sys
model_dir = sys.argv[1]
sys.path.insert(0, model_dir)
try:
    from types import SimpleNamespace
    import numpy as np
    from handlers import codec
    from handlers.manifest import Manifest
    import handler
    manifest = Manifest.read(model_dir)
    spec = manifest.inputs[0]
    context = SimpleNamespace(system_properties={"model_dir": model_dir, "gpu_id": None, "batch_size": 1},
                              model_yaml_config={"maxWorkers": 1}, manifest={}, metrics=None)
    worker = handler.GradserveHandler()
    worker.initialize(context)
    x = np.zeros((2, *spec.row_shape), dtype=np.float32)
    (answer,) = worker.handle([{"data": codec.encode({spec.name: x})}], context)
    message = codec.decode(answer)
    if message.error is not None:
        raise RuntimeError(f"{message.error.code}: {message.error.message}")
    got = {name: [list(a.shape), codec.datatype_of(a.dtype)] for name, a in message.tensors.items()}
    want = {o.name: [[2, *o.shape[1:]], o.datatype] for o in manifest.outputs}
    if got != want:
        raise RuntimeError(f"the handler answered {got}, the manifest declares {want}")
    print(json.dumps({"ok": True, "model_code": sys.modules[type(worker.model).__module__].__file__}))
except BaseException as e:
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
"""


def check_archive(archive: Path, timeout: float = 180.0) -> str:
    """The model code file the clean interpreter used; UsageError saying what failed and what to do."""
    with tempfile.TemporaryDirectory(prefix="gradserve-check-") as tmp:
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(tmp)
        done = subprocess.run([sys.executable, "-I", "-c", CHECK, tmp], capture_output=True, text=True,
                              timeout=timeout, cwd=tmp)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"ok": False, "error": done.stderr.strip()[-2000:] or "no answer"}
    if not result["ok"]:
        raise UsageError(f"the archive does not work in a clean interpreter, as TorchServe would run it: "
                         f"{result['error']}. Check that the model factory imports only what its own module or "
                         "package and the serving environment have, and that it rebuilds the trained model from "
                         "the same args; nothing was written")
    return str(result["model_code"])
