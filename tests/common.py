"""Helpers every test area imports (conftest.py files are not importable by name: there are several)."""

from __future__ import annotations

from pathlib import Path

from gradserve.net import free_port

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "free_port"]
