"""Where rows come from: a data file or directory (or a `datasets.Dataset` from Python), read into
records by a row parser (data/records.py), each bad row a `DataError` naming it (or, with
`skip_malformed`, counted and dropped).

- `.jsonl` / `.ndjson`: read line by line here, so an error names `file:line` (bytes that are not
  UTF-8 too) and one bad line can be skipped;
- `.json`, `.parquet`, `.csv` files and a `save_to_disk` directory: through `datasets` (imported
  only for them), an error naming `file: row N` (counting from 1);
- a `datasets.Dataset` (or a DatasetDict with a "train" split) passed from Python.
A name that is no local path (a Hugging Face Hub data set) is refused in one line: nothing is
downloaded at run time.

Column mapping: `columns` {our name: the data's name} renames a row's columns before it is parsed
(data.prompt_column=question reads the "question" column as the prompt); a row without a mapped
column is an error naming it.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..runs.path_checks import not_found
from .records import DataError, decode_line, numbered_lines

JSONL_SUFFIXES = (".jsonl", ".ndjson")
_DATASETS_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class ReadResult:
    records: list
    skipped: int       # malformed rows dropped (only with skip_malformed)
    errors: list[str]  # their messages, for the log
    where: list[str]   # "file:line" (or "file: row N") of each record, for errors found later


def is_dataset(source) -> bool:
    """Whether `source` is a datasets.Dataset or DatasetDict (without importing datasets)."""
    return type(source).__module__.split(".")[0] == "datasets"


def source_name(source) -> str:
    return "the dataset" if is_dataset(source) else str(source)


def read_records(source, parse: Callable[[dict], object], skip_malformed: bool = False,
                 columns: dict[str, str] | None = None) -> ReadResult:
    """Parse every row of `source` (a path or a Dataset) with `parse(dict) -> record`, after
    renaming its columns per `columns` ({our name: data's name}, see the module docstring)."""
    records, where, errors = [], [], []
    for location, row in _rows(source):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            records.append(parse(renamed(row, columns or {})))
            where.append(location)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            message = f"{location}: {e}"
            if not skip_malformed:
                raise DataError(message) from None
            errors.append(message)
    if not records:
        malformed = f" ({len(errors)} malformed)" if errors else ""
        raise DataError(f"{source_name(source)}: no usable rows{malformed}")
    return ReadResult(records, len(errors), errors, where)


def renamed(row: dict, columns: dict[str, str]) -> dict:
    """`row` with column columns[ours] read as `ours` (and no longer under its own name); the other
    columns as they are."""
    if not columns:
        return row
    mapped = set(columns) | set(columns.values())
    out = {k: v for k, v in row.items() if k not in mapped}
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
        elif ours != theirs:
            raise ValueError(f"no column {theirs!r} (data.{ours}_column); the row has "
                             f"{sorted(row)}")
    return out


def _rows(source) -> Iterator[tuple[str, object]]:
    """(location, row dict or the ValueError that reading it raised) of every row of `source`."""
    if is_dataset(source):
        yield from _dataset_rows(_train_split(source, "the dataset"), "dataset")
        return
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in JSONL_SUFFIXES:
        yield from _jsonl_rows(path)
    elif path.is_dir() or (path.is_file() and suffix in _DATASETS_BUILDERS):
        yield from _dataset_rows(_load(path), str(path))
    elif path.is_file():
        raise DataError(f"{path}: expected a .jsonl, .json, .parquet or .csv file, or a directory "
                        "written by datasets' save_to_disk")
    else:
        raise DataError(not_found(str(source)))


def _jsonl_rows(path: Path):
    for lineno, raw in numbered_lines(path):
        try:
            row = json.loads(decode_line(raw))
        except (ValueError, RecursionError) as e:
            row = e if isinstance(e, ValueError) else ValueError("JSON nested too deeply")
        yield f"{path}:{lineno}", row


def _dataset_rows(dataset, name: str):
    for i, row in enumerate(dataset, 1):
        yield f"{name}: row {i}", row


def _train_split(data, name: str):
    """A Dataset as it is; a DatasetDict's "train" split (or its only one)."""
    if not hasattr(data, "keys"):
        return data
    splits = list(data.keys())
    if "train" in splits or len(splits) == 1:
        return data["train" if "train" in splits else splits[0]]
    raise DataError(f"{name}: holds the splits {splits} and none is named 'train'; give one "
                    "split's data")


def _load(path: Path):
    """The rows of a .json/.parquet/.csv file or a save_to_disk directory, read by datasets without
    its progress bars, into memory (its cache goes to a temporary directory, removed after)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading it needs the `datasets` package, which is not installed "
                        "(pip install datasets), or give the rows as a .jsonl file") from None

    with _quiet(datasets), tempfile.TemporaryDirectory(prefix="fusedrl-datasets-") as cache:
        try:
            if path.is_dir():
                saved = datasets.load_from_disk(str(path), keep_in_memory=True)
                return _train_split(saved, str(path))
            builder = _DATASETS_BUILDERS[path.suffix.lower()]
            return datasets.load_dataset(builder, data_files=str(path), split="train",
                                         cache_dir=cache, keep_in_memory=True)
        except DataError:
            raise
        except (FileNotFoundError, ValueError, OSError, TypeError) as e:
            kind = ("a directory written by datasets' save_to_disk" if path.is_dir()
                    else f"a {path.suffix} file")
            raise DataError(f"{path}: cannot be read as {kind}: {_reason(e)}") from None
        except Exception as e:  # datasets' own errors (a schema that does not fit, a corrupt file)
            raise DataError(f"{path}: datasets could not read it: {_reason(e, wrapper=True)}"
                            ) from None


def _reason(error: BaseException, wrapper: bool = False) -> str:
    """`error`'s type and first line and, where it has a cause, its chain's root's (the parser's
    own words: the row, the character). `wrapper`: an error that may only say that another
    happened (datasets' DatasetGenerationError: "An error occurred while generating the
    dataset"), shown by its direct cause instead when it has one."""
    chain = _chain(error)
    if wrapper and len(chain) > 1:
        chain = chain[1:]
    shown = _first_line(chain[0])
    return shown if len(chain) == 1 else f"{shown} (from {_first_line(chain[-1])})"


def _chain(error: BaseException) -> list[BaseException]:
    """`error`, then the error it was raised from or while handling, down to the root, as Python
    shows the chain under a traceback."""
    chain = [error]
    while True:
        last = chain[-1]
        below = last.__cause__ if last.__cause__ is not None else (
            None if last.__suppress_context__ else last.__context__)
        if below is None or any(below is e for e in chain):
            return chain
        chain.append(below)


def _first_line(error: BaseException) -> str:
    """The exception's type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


@contextlib.contextmanager
def _quiet(datasets):
    """datasets' progress bars and log lines off while it reads (its failure is our one line), as
    they were after."""
    was_on = not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_on:
            datasets.utils.enable_progress_bars()
