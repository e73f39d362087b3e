"""What every stage does before building its models: check what the user named (model directories,
input files, the output directory, the device), join torchrun's process group (if any), seed the
RNGs, pick the parameter dtype (train.precision), load the tokenizer.

The checks come first and are cheap, so a wrong path or an unwritable output_dir is a one-line
usage error (engine/errors.py) before anything slow happens, never after the models are loaded; the
command line runs the path checks (engine/path_checks.py) even before importing torch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.train import RunConfig
from ..errors import UsageError
from ..model.hf_io import load_config
from ..path_checks import check_model_path, check_paths
from .. import distributed
from .precision import param_dtype, resolve_precision


@dataclass
class RunContext:
    device: torch.device
    dtype: torch.dtype       # of the models' parameters (train.precision)
    tokenizer: object
    configs: dict            # {option: ModelConfig} of the model directories checked


def resolve_device(name: str | None, option: str = "train.device") -> torch.device:
    """`name` as a torch device (default: cuda when available); a CUDA device without one is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{option}={name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option}={name!r} but no CUDA GPU is available to torch "
                             f"(use {option}=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option}={name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def check_model_dir(path, option: str):
    """`path` must be a Hugging Face model directory (with config.json) of a supported architecture;
    returns its ModelConfig (read from config.json alone: no weights are loaded)."""
    check_model_path(path, option)
    return load_config(Path(path))


def start_run(seed: int, options: RunConfig, output_dir: str, models: dict, files: dict) -> RunContext:
    """Check everything first: `models` {option: model directory, or None when unused} (the first
    one's tokenizer is the run's), `files` {option: input file or None}, output_dir (engine/path_checks.py),
    the models' config.json and the device of `options` (the stage's `train` section). Then join torchrun's process group when launched by
    it (a bare `cuda` becomes this rank's GPU, cuda:LOCAL_RANK) and seed python's and torch's RNGs
    with `seed` (the same on every rank: models are built identically before sharding)."""
    check_paths(models, files, output_dir)
    configs = {option: load_config(Path(path)) for option, path in models.items() if path}
    device = resolve_device(options.device)
    distributed.init_distributed(device.type, options.dist_timeout_s)
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    random.seed(seed)
    torch.manual_seed(seed)
    return RunContext(device, param_dtype(resolve_precision(options.precision, device)),
                      AutoTokenizer.from_pretrained(next(iter(models.values()))), configs)
