"""Byte counts in and out of text ("80GB", "79.5GiB" -> bytes; bytes -> "29.5 GB"). Torch-free:
the command line parses --gpu-memory before importing torch."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, option: str = "--gpu-memory") -> int:
    """'80GB' (decimal, as GPUs are sold), '79.6GiB', '8e10' -> bytes; a ValueError naming `option`
    for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match[2] not in _UNITS or float(match[1]) <= 0:
        raise ValueError(
            f"{option}={text!r}: expected a positive size such as 80GB, 79.6GiB or 8e10 (bytes)")
    return int(float(match[1]) * _UNITS[match[2]])


def format_bytes(n: int) -> str:
    """Bytes as decimal GB with one decimal ('29.5 GB'); below 0.1 GB in MB; nothing as '-'."""
    if n == 0:
        return "-"
    return f"{n / 1e9:.1f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"
