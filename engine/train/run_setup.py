"""What every stage does before building its models: join torchrun's process group (if any), seed
the RNGs, pick the device and the parameter dtype, load the tokenizer."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..config.train import RunConfig
from . import distributed
from .precision import param_dtype, resolve_precision


@dataclass
class RunContext:
    device: torch.device
    dtype: torch.dtype       # of the models' parameters (train.precision)
    tokenizer: object


def resolve_device(name: str | None) -> torch.device:
    """The device of `name` (default: cuda when available); a bare "cuda" under torchrun is this
    rank's GPU, cuda:LOCAL_RANK."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available")
    return device


def start_run(seed: int, options: RunConfig, tokenizer_dir: str) -> RunContext:
    """Join torchrun's process group when launched by it; seed python's and torch's RNGs with `seed`
    (the same on every rank: models are built identically before sharding); the device and dtype
    of `options` (the stage's `train` section); the tokenizer of tokenizer_dir."""
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    distributed.init_distributed(resolve_device(options.device).type, options.dist_timeout_s)
    random.seed(seed)
    torch.manual_seed(seed)
    device = resolve_device(options.device)
    return RunContext(device, param_dtype(resolve_precision(options.precision, device)),
                      AutoTokenizer.from_pretrained(tokenizer_dir))
