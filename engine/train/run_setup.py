"""What every stage does before building its models: seed the RNGs, pick the device and the
parameter dtype, load the tokenizer."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..config.train import RunConfig
from .precision import param_dtype, resolve_precision


@dataclass
class RunContext:
    device: torch.device
    dtype: torch.dtype       # of the models' parameters (train.precision)
    tokenizer: object


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available")
    return device


def start_run(seed: int, options: RunConfig, tokenizer_dir: str) -> RunContext:
    """Seed python's and torch's RNGs with `seed`; the device and dtype of `options` (the stage's
    `train` section); the tokenizer of tokenizer_dir."""
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    random.seed(seed)
    torch.manual_seed(seed)
    device = resolve_device(options.device)
    return RunContext(device, param_dtype(resolve_precision(options.precision, device)),
                      AutoTokenizer.from_pretrained(tokenizer_dir))
