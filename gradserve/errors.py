"""The one exception a command raises for a mistake its user can fix.

Library code raises `UsageError` (or a subclass) with a message that says what to do; `gradserve`'s
dispatcher (gradserve/cli.py) prints that message and exits with the error's `exit_code`. Nothing below the
command's edge calls sys.exit or raises SystemExit.
"""

from __future__ import annotations


class UsageError(Exception):
    """What was asked cannot be done as asked; the message says why and what to do instead."""

    exit_code = 2


class ConfigError(UsageError):
    """gradserve.yaml or a command-line flag holds something impossible."""
