"""What every stage does before building its models: seed the RNGs, pick the device, load the
tokenizer."""
from __future__ import annotations

import random

import torch


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available")
    return device


def start_run(seed: int, device_name: str | None, tokenizer_dir: str):
    """Seed python's and torch's RNGs with `seed`; return (device, tokenizer of tokenizer_dir)."""
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    random.seed(seed)
    torch.manual_seed(seed)
    return resolve_device(device_name), AutoTokenizer.from_pretrained(tokenizer_dir)
