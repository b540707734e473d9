"""``python -m ctrefine.train`` / ``deepspeed --module ctrefine.train``: the training entry point.

The driver lives in :mod:`ctrefine.training.driver` (its docstring has every launch command); the
stages in :mod:`ctrefine.training.stages`. This module exists so the launcher's ``--module`` target
is short and stable.
"""
import sys

from .training.driver import main

if __name__ == "__main__":
    sys.exit(main())
