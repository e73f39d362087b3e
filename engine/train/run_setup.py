"""What both stages do before training: pick the device, seed, load the tokenizer and the data."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..data.examples import Examples, load_examples
from ..config.train import StageConfig


@dataclass
class RunSetup:
    device: torch.device
    tokenizer: object
    examples: Examples


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available")
    return device


def prepare_run(cfg: StageConfig, stage: str) -> RunSetup:
    """Seed the RNGs from cfg.seed and load the tokenizer (from cfg.model) and the data."""
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    return RunSetup(resolve_device(cfg.train.device), tokenizer,
                    load_examples(cfg.data, tokenizer, stage, cfg.seed))
