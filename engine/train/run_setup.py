"""What every stage does before building its models: check what the user named (model directories,
input files, the output directory, the device), join torchrun's process group (if any), take the
output directory (engine/runs/run_dir.py: its lock, the check that it is new, empty or this stage's
earlier run, its marker), seed the RNGs, pick the parameter dtype (train.precision), load the
tokenizer.

The checks come first and are cheap, so a wrong path or an unwritable output_dir is a one-line
usage error (engine/errors.py) before anything slow happens, never after the models are loaded; the
command line runs the path checks (engine/runs/path_checks.py) even before importing torch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config.train import RunConfig
from ..data.vision_processor import VisionProcessor, is_vision_directory
from ..runs import run_dir
from ..errors import ModelError, UsageError
from ..model.hf_io import TOKENIZER_PROBE, load_config, load_tokenizer, tokenizer_encodes
from ..runs.path_checks import check_model_path, check_paths
from ..parallel import distributed
from ..parallel.dims import ParallelDims
from ..parallel.validate import check_models
from ..runs.run_paths import run_inputs
from .precision import param_dtype, resolve_precision
from .trackers import check_installed, tracker_names


@dataclass
class RunContext:
    device: torch.device
    dtype: torch.dtype       # of the models' parameters (train.precision)
    tokenizer: object
    configs: dict            # {option: ModelConfig} of the model directories checked
    dims: ParallelDims       # the job's parallel layout (engine/parallel/dims.py)
    config: object = None    # the stage's config as the run runs it (`check`'s, auto resolved)
    # A vision model's VisionProcessor (data/vision_processor.py: the tokenizer and its image
    # processor), which reads the data in place of the tokenizer; None for a text model.
    processor: object = None

    @property
    def data_reader(self):
        """What reads the run's data: the processor of a vision model, else the tokenizer."""
        return self.processor if self.processor is not None else self.tokenizer


def resolve_device(name: str | None, option: str = "train.device") -> torch.device:
    """`name` as a torch device (default: cuda when available); a CUDA device without one is an
    error."""
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
            raise UsageError(
                f"{option}={name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def check_model_dir(path, option: str):
    """`path` must be a Hugging Face model directory (with config.json) of a supported architecture;
    returns its ModelConfig (read from config.json alone: no weights are loaded)."""
    check_model_path(path, option)
    return load_config(Path(path))


def claim_output_dir(kind: str, options: RunConfig, output_dir: str, inputs: list) -> None:
    """Take output_dir for the stage `kind` (run_dir.claim with the stage's train.resume and
    train.overwrite): rank 0 takes it and the other ranks wait for its answer, so a refusal is the
    same one-line error on every rank and nothing is written by a rank before the lock is held."""
    problem = None
    if distributed.is_main():
        try:
            run_dir.claim(output_dir, kind, overwrite=options.overwrite, resume=options.resume,
                          inputs=inputs, overwrite_option="train.overwrite=true",
                          resume_option="train.resume=true")
        except Exception as e:
            problem = e
    message = distributed.broadcast(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if message is not None:
        raise UsageError(message)


def start_run(seed: int, options: RunConfig, output_dir: str, models: dict, files: dict, kind: str,
              config=None, check: Callable | None = None) -> RunContext:
    """Check everything first: the packages of the trackers of `options` (the stage's `train`
    section), `models` {option: model directory, or None when unused} (the first one's tokenizer is
    the run's), `files` {option: input file or None}, output_dir (engine/runs/path_checks.py), the
    models' config.json and the device of `options`. Then join torchrun's process group when
    launched by it (a bare `cuda` becomes this rank's GPU, cuda:LOCAL_RANK); `config`, the stage's
    whole config, is then checked by `check(config, device, world size)`, which returns it as the
    run runs it (the stage's start-up refusals and auto options: engine/plan/check.py), before any
    model loads and before the job's parallel dims (`RunContext.dims`) are built from `options`;
    load the tokenizer (run_tokenizer); then take output_dir for the stage `kind`
    (claim_output_dir; the stage's entry point releases it: run_dir.releases_output_dir) and seed
    python's and torch's RNGs with `seed` (the same on every rank: models are built identically
    before sharding)."""
    check_installed(tracker_names(options))
    check_paths(models, files, output_dir)
    configs = {option: load_config(Path(path)) for option, path in models.items() if path}
    device = resolve_device(options.device)
    distributed.init_distributed(device.type, options.dist_timeout_s)
    if device.type == "cuda" and device.index is None and distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    if check is not None:
        config = check(config, device, distributed.world_size())
    check_models(options, distributed.world_size(), configs)
    dims = ParallelDims.from_train(options, distributed.world_size(), device.type)
    option, first = next(iter(models.items()))
    tokenizer = run_tokenizer(option, first)
    first = Path(first)
    processor = (VisionProcessor.from_pretrained(first, tokenizer) if is_vision_directory(first)
                 else None)
    vision = configs[option].vision
    if processor is not None and vision is not None:
        try:
            processor.check_model(vision, f"{option}={first}")
        except ValueError as e:
            raise ModelError(str(e)) from None
    inputs = run_inputs(config) if config is not None else [*models.values(), *files.values()]
    claim_output_dir(kind, options, output_dir, inputs)
    random.seed(seed)
    torch.manual_seed(seed)
    dtype = param_dtype(resolve_precision(options.precision, device))
    return RunContext(device, dtype, tokenizer, configs, dims, config, processor)


def run_tokenizer(option: str, path):
    """The tokenizer of model directory `path` (the option naming it), which must turn a text
    into tokens: ModelError naming the directory for an empty one (a tokenizer.json without a
    vocabulary)."""
    tokenizer = load_tokenizer(path)
    if not tokenizer_encodes(tokenizer):
        raise ModelError(f"{option}={path}: its tokenizer is empty (it turns {TOKENIZER_PROBE!r} "
                         "and its own vocabulary into no tokens): save the tokenizer the model "
                         "was trained with there")
    return tokenizer
