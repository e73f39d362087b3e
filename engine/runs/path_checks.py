"""Checks of the paths a user names (model directories, input files, the output directory),
torch-free so that every command runs them before importing torch or transformers: a wrong path is a
one-line usage error (engine/errors.py) within a fraction of a second, never after seconds of
imports."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from ..errors import UsageError

CONFIG_FILE = "config.json"


def not_found(source: str) -> str:
    """The one line for a data source that is no local file or directory."""
    hub = "/" in source.strip("/") and not Path(source).suffix and not source.startswith((".", "/"))
    advice = ("; data sets are read from local files only (nothing is downloaded): on a machine "
              f"with a network, datasets.load_dataset({source!r}).save_to_disk(DIR), then give DIR")
    return f"{source}: no such file or directory" + (advice if hub else "")


def check_model_path(path, option: str) -> None:
    """`path` must be a directory holding a Hugging Face config.json (its contents are read
    later)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(
            f"{option}={path}: no such directory (expected a Hugging Face model directory)")
    if not p.is_dir() or not (p / CONFIG_FILE).is_file():
        raise UsageError(f"{option}={path}: not a Hugging Face model directory (no {CONFIG_FILE})")


# A tokenizer's own files, by format: fast (tokenizer.json), sentencepiece, BPE (vocab.json +
# merges.txt), WordPiece; tokenizer_config.json alone names a class, not a vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json", "vocab.txt", "tokenizer.tiktoken")


def check_tokenizer_files(path, option: str) -> None:
    """Model directory `path` must hold a tokenizer (transformers would build an empty one from
    config.json alone, and the run would fail later on its first text)."""
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{option}={path}: the model directory has no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)}): save the tokenizer it was trained with "
                         "there (tokenizer.save_pretrained(DIR))")


def check_image_processor(path, option: str) -> None:
    """A vision-language model directory (`vision_config` in its config.json) must hold its image
    processor (preprocessor_config.json): without it the run would read its rows as text, their
    images silently left out."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # load_config names what is wrong with it
        return
    if (isinstance(config, dict) and config.get("vision_config") is not None
            and not (Path(path) / "preprocessor_config.json").is_file()):
        raise UsageError(
            f"{option}={path}: a vision-language model ({config.get('model_type')}) without its "
            "image processor (preprocessor_config.json), which reads its rows' images: save its "
            "processor there (processor.save_pretrained(DIR))")


# What datasets' save_to_disk writes in its directory: a Dataset's state, a DatasetDict's splits.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


def check_input_file(path, option: str) -> None:
    """`path` must be a regular data file (a FIFO or a device such as /dev/zero would block or
    never end), or a directory written by datasets' save_to_disk."""
    p = Path(path)
    if p.is_dir():
        if not any((p / name).is_file() for name in SAVED_DATASET_FILES):
            raise UsageError(f"{option}={path}: is a directory, expected a data file or a "
                             "directory written by datasets' save_to_disk")
    elif p.exists() and not p.is_file():
        raise UsageError(f"{option}={path}: not a regular file (a FIFO or a device), expected a "
                         "file")
    elif not p.exists():
        raise UsageError(f"{option}={not_found(str(path))}")


def check_output_dir(path, option: str = "output_dir") -> None:
    """`path` must be a writable directory, or creatable as one. Nothing is created: a command
    refused later leaves no directory behind (the command creates it when it takes it,
    run_dir.claim)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option}={path}: exists and is not a directory")
    existing = p
    while not existing.exists():  # the nearest existing directory above it holds the new ones
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        # the real test: permissions, read-only mounts, quotas
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{option}={path}: not a writable directory ({e.strerror})") from None


def check_run_dir(path) -> None:
    """`path` must be a run directory: it holds the run's metrics.jsonl."""
    if not (Path(path) / "metrics.jsonl").is_file():
        raise UsageError(f"no metrics.jsonl in {path}: not a fusedrl run directory")


def check_paths(models: dict, files: dict, output_dir) -> None:
    """Every path a stage's config names: `models` and `files` {option: path or None (unused)}, and
    the output directory. The first model's tokenizer is the run's: it must have one."""
    for option, path in models.items():
        if path:
            check_model_path(path, option)
    for option, path in files.items():
        if path:
            check_input_file(path, option)
    check_output_dir(output_dir)
    option, path = next(iter(models.items()))
    if path:
        check_tokenizer_files(path, option)
        check_image_processor(path, option)
