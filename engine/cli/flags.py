"""The flags every `fusedrl` command shares: --debug and --quiet. Torch-free."""
from __future__ import annotations

import argparse

from .. import errors


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on the top-level parser and on each command (before or after the command name).
    SUPPRESS: a command's parser must not reset a --debug given before the command to False."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error (also: {errors.DEBUG_ENV}=1)")


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (train.progress=false), and no warnings, notes "
                             "or progress bars of transformers and datasets themselves (errors "
                             "stay)")
