"""The data files a run reads, recorded by size and sha256 in RUN_DIR/data_files.json each time the
run starts, so a run resumed on data changed at the same path says so: its data order and position
were computed on the old contents."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..runs.durable import write_text_atomic

DATA_RECORD = "data_files.json"


def file_record(path) -> dict:
    """{"path", "size", "sha256"} of the file `path`."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path), "size": Path(path).stat().st_size, "sha256": digest}


def record_data(run_dir, files: dict) -> list[str]:
    """Record `files` ({option: path or None}) in run_dir/data_files.json; returns one line per
    file whose size or contents differ from the record an earlier start of the run left there."""
    path = Path(run_dir) / DATA_RECORD
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        earlier = {}
    now = {option: file_record(file) for option, file in files.items() if file}
    changed = []
    for option, record in now.items():
        before = earlier.get(option) if isinstance(earlier, dict) else None
        if not isinstance(before, dict):
            continue
        if (before.get("size"), before.get("sha256")) != (record["size"], record["sha256"]):
            changed.append(f"{option}={record['path']} changed since the run began "
                           f"({before.get('size')} bytes then, {record['size']} now): resuming on "
                           "its new contents, in the data order and at the position computed on "
                           "the old")
    write_text_atomic(path, json.dumps(now, indent=1) + "\n")
    return changed
