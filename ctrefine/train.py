"""``python -m ctrefine.train`` / ``deepspeed --module ctrefine.train``: the training entry point.

``ctrefine train`` under another name: the options are parsed by :mod:`ctrefine.cli` (``ctrefine train
--help`` lists them and every launch command), the driver is :mod:`ctrefine.training.driver`. This module
exists so the launcher's ``--module`` target is short and stable.
"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
