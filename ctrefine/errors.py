"""How a failure reaches the user: the one user-error family of ctrefine, the argument parser whose
usage errors are one line, and :func:`run_main`, the one place an entry point turns them into exits.

A :class:`UserError` is something the *user* can fix -- a missing file, a bad config value, a
dataset of the wrong size -- and the CLI prints it as one line on stderr with a non-zero exit.
Anything else (a ``ValueError`` from a bug, a shape mismatch deep in a model) is a programming error
and keeps its traceback: turning every exception into one line hides bugs.

The subclasses are also ``ValueError`` so that library callers who catch ``ValueError`` around a
config or data call keep working.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


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


def run_main(prog: str, work: Callable[[], int], interrupted: str) -> int:
    """Run an entry point's ``work``: a :class:`UserError` or an ``OSError`` (a disk, permission or path
    problem of the user's machine, not a bug) becomes ``PROG: error: ...`` on stderr and exit 2, Ctrl-C
    ``PROG: interrupted ...`` (``interrupted`` says what was kept) and exit 130; anything else is a bug
    and keeps its traceback."""
    try:
        return work()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 2
