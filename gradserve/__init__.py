"""gradserve: gradient-norm monitored training, TorchServe archives, an Open Inference Protocol front door."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradserve")  # pyproject.toml's, the one place the version is written
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
