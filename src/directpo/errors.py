"""The errors that are the user's to fix, told apart from directpo's own bugs.

A `UserError` is a mistake in the input, the settings or the environment (a bad row, an unknown
setting, a missing package), or a run that stopped on purpose and says why (Ctrl-C, a diverged
loss): the command line prints its message as one line, `directpo COMMAND: error: message`, and
exits with its `exit_code` (2), no traceback. Filesystem errors (`OSError`: a missing file, a full
disk) are about the user's files and are printed the same way. Anything else that escapes a command
is a bug in directpo: the CLI shows its traceback and asks for a report.

The classes keep their builtin bases too (`DataError` is a `ValueError`, `RunLockedError` an
`OSError`, ...), so `except ValueError` in a caller catches them as before. This module is the
bottom of the package: it imports nothing of directpo.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix, or a run stopped on purpose: one line in the CLI, no traceback.

    `exit_code`: the CLI's exit status; `label`: the word before the message (`error: ...`), empty
    for a run stopped on purpose that is not an error (Ctrl-C)."""

    exit_code = 2
    label = "error: "


class UserValueError(UserError, ValueError):
    """A bad value in the input or the settings (a `ValueError`: `except ValueError` still catches it)."""


class MissingPackageError(UserError, ImportError):
    """An optional package a chosen feature needs is not installed (the message says what to install)."""
