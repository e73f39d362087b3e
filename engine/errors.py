"""The errors a user sees as one line, and how the `fusedrl` command turns any exception into one.

`FusedRLError` is a failure the user can act on (bad data, a corrupt model, a diverged run): the
command prints `fusedrl <command>: <message>` and exits 1. `UsageError` is a mistake in what was
asked (an option value, a path that does not exist, a device that is not there): exit 2, as for
argparse's own errors. Any other exception is one of our bugs, also shown as one line (its type and
message, "unexpected", with a hint), since a traceback is for developers: `--debug` or
FUSEDRL_DEBUG=1 shows it instead. Under torchrun every rank reads the same options, so a usage error
is printed by rank 0 alone (`should_print`); a failure by each rank that has it.
Torch-free, so the command's parsing stays light.
"""
from __future__ import annotations

import os
import time

DEBUG_ENV = "FUSEDRL_DEBUG"
# a message longer than this (e.g. a library's dump) is cut: one line stays one line
_MAX_MESSAGE = 600


class FusedRLError(Exception):
    """A user-facing failure; the CLI prints the message alone and exits with `exit_code`."""
    exit_code = 1


class UsageError(FusedRLError):
    """A mistake in the command's options, arguments or paths (exit 2)."""
    exit_code = 2


class ConfigValueError(UsageError, ValueError):
    """A value the user chose (a config option, a command-line argument) that cannot work, found
    where it is used: a usage error for the command, still a ValueError for library callers."""


class ModelError(FusedRLError, ValueError):
    """A model directory that cannot be used: missing files, corrupt weights, unsupported
    architecture."""


class NonFiniteError(FusedRLError, RuntimeError):
    """NaN or inf where a number must be finite: a diverged run, a model producing NaN, a NaN to be
    written."""


class Interrupted(FusedRLError):
    """A run stopped by SIGTERM or SIGINT at a step boundary, its checkpoint saved: the exit code is
    128 + the signal's number (143, 130), what a shell reports for a process the signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunComplete(FusedRLError):
    """A rerun of a run that already reached its last step and wrote its final model: nothing was
    changed (exit 0). `final`: that model's directory."""
    exit_code = 0

    def __init__(self, message: str, final):
        super().__init__(message)
        self.final = final


def debug_enabled(flag: bool = False) -> bool:
    """--debug, or FUSEDRL_DEBUG set to anything but '', '0' or 'false'."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


def should_print(error: BaseException) -> bool:
    """False on a torchrun rank other than 0 for what every rank meets alike (a usage error, a run
    stopped or found complete by all ranks together): rank 0 says the same line."""
    alike = isinstance(error, (UsageError, Interrupted, RunComplete))
    return not alike or os.environ.get("RANK", "0") == "0"


# Seconds a torchrun rank other than 0 waits before exiting on a usage error that rank 0 prints.
SILENT_RANK_GRACE_S = 3.0


def let_rank_0_speak() -> None:
    """Wait SILENT_RANK_GRACE_S before a silent rank exits (should_print False): torchrun stops
    every rank at the first exit, which could cut rank 0 off before it prints the one line."""
    time.sleep(SILENT_RANK_GRACE_S)


def one_line(error: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for any exception reaching the command's top level."""
    if isinstance(error, FusedRLError):
        code, message = error.exit_code, str(error)
    elif isinstance(error, OSError) and error.filename is not None:
        code, message = 1, f"{error.filename}: {error.strerror or error}"
    else:
        code = 1
        message = (f"{type(error).__name__}: {error} (unexpected; rerun with --debug or "
                   f"{DEBUG_ENV}=1 for the traceback)")
    message = " ".join(message.split())
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + " ..."
    return code, message
