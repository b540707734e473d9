"""The one user-error family of ctrefine.

A :class:`UserError` is something the *user* can fix -- a missing file, a bad config value, a
dataset of the wrong size -- and the CLI prints it as one line on stderr with a non-zero exit.
Anything else (a ``ValueError`` from a bug, a shape mismatch deep in a model) is a programming error
and keeps its traceback: turning every exception into one line hides bugs.

The subclasses are also ``ValueError`` so that library callers who catch ``ValueError`` around a
config or data call keep working.
"""
from __future__ import annotations

import argparse


class UserError(Exception):
    """A problem with the user's input or environment; its message is one line."""


class ConfigError(UserError, ValueError):
    """Invalid configuration (the message names the key)."""


class DataError(UserError, ValueError):
    """A user-supplied file is unreadable or not what it claims to be."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (plus a pointer to ``--help``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
