"""One result schema for every suite, and what is made of it: `results.json`, `results.md`, the
comparison of two result files.

    {"meta": {"device", "driver", "limits", "versions", "commit", "command", "time_utc",
              "backend", "triton_interpreter", "attention", "ended", ...},
     "rows": [{"suite": "headline" | "kernels" | "generate" | "train" | "rl", "name", "impl",
               "status", "fraction_of_limit", "limit", "seconds", "seconds_p20", "seconds_p80",
               "n", "setup_s", "compile_s", "measure_s", <figures>, "not_finite"?}, ...]}

A row is one implementation (ours or a peer, named with its version) of one case; `status` is
"ok", "not installed" or the error that stopped it, and a row that did not run has no figures:
nothing is made up for a missing peer. A figure that came out NaN or infinite is recorded as null
and its key listed in `not_finite` (record.py). `fraction_of_limit` is the row's share of the
device's limit named by `limit` (devices.py): bandwidth for memory-bound work, FLOP/s for the
rest, the decode roofline for generation. Torch-free: `fusedrl bench compare` reads files only.
"""
from __future__ import annotations

import json
import math
import os

from .options import SUITES

# The status of a row that replays a CUDA graph, on a device without CUDA.
NO_CUDA_GRAPHS = "not run: CUDA graphs need a CUDA device"
# A row's keys that are not figures (compare and the table treat them apart).
LABELS = ("suite", "name", "impl", "status", "limit", "peer_version", "note", "not_finite")
# Figures the table leaves out (the spread and the phases have columns of their own; elapsed_s
# is when the row landed).
NOT_COLUMNS = ("seconds_p20", "seconds_p80", "n", "setup_s", "compile_s", "measure_s",
               "elapsed_s")


def make_row(suite: str, name: str, impl: str, *, fraction_of_limit: float | None, limit: str,
             status: str = "ok", **figures) -> dict:
    """One row of the schema; figures are numbers (None: not measured here)."""
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r}: expected one of {', '.join(SUITES)}")
    return {"suite": suite, "name": name, "impl": impl, "status": status,
            "fraction_of_limit": fraction_of_limit, "limit": limit, **figures}


def missing_row(suite: str, name: str, impl: str, status: str, limit: str) -> dict:
    """The row of a peer that did not run here (`status` says why): no figures."""
    return make_row(suite, name, impl, fraction_of_limit=None, limit=limit, status=status)


def is_finite_number(value) -> bool:
    """A number that is neither a bool, nor NaN nor infinite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def figures(row: dict) -> dict:
    """The row's numeric figures, fraction_of_limit included (a NaN or infinite one left out)."""
    return {k: v for k, v in row.items() if k not in LABELS and is_finite_number(v)}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# The header of the process's resident-set column: never the row's own peak.
PROCESS_RSS_HEAD = "process RSS high-water mark (GiB; the process's so far, not the row's)"
# The table's figure columns (header with its unit, the row keys that fill it, first found): the
# rest of a row's figures are in results.json.
COLUMNS = (("tok/s", ("tok_s", "tokens_per_s", "tokens_per_s_per_gpu")),
           ("tok/s, all GPUs", ("tokens_per_s_total",)),
           ("GB/s", ("gbps",)), ("peak (MiB)", ("peak_extra_mib",)),
           ("peak (GiB)", ("peak_gib",)), ("plan peak (GiB)", ("plan_peak_gib",)),
           # the whole bench process's resident-set high-water mark when the row landed (CPU
           # rl rows): it only grows over a run, and is not the row's peak nor the plan's
           (PROCESS_RSS_HEAD, ("process_peak_rss_gib",)))


def status_text(row: dict) -> str:
    """The row's status, and which of its figures were not finite (recorded as null)."""
    status = str(row.get("status", "-"))
    bad = row.get("not_finite")
    return f"{status} (not finite: {', '.join(map(str, bad))})" if bad else status


def _time_cells(row: dict) -> list[str]:
    """time (ms), p20-p80 (n), and setup / compile / measure seconds."""
    if row.get("seconds") is None:
        return ["-", "-", "-"]
    spread = (f"{row['seconds_p20'] * 1e3:.3g}-{row['seconds_p80'] * 1e3:.3g} "
              f"({_cell(row.get('n'))})" if row.get("seconds_p20") is not None
              and row.get("seconds_p80") is not None else "-")
    phases = "/".join(_cell(row.get(k)) for k in ("setup_s", "compile_s", "measure_s"))
    return [f"{row['seconds'] * 1e3:.4g}", spread, phases]


def _first(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if row.get(k) is not None), None)


def suite_table(rows: list[dict]) -> list[str]:
    """One suite's table: the time with its spread and phases, then only the COLUMNS its rows
    have, units in the headers."""
    columns = [(head, keys) for head, keys in COLUMNS if any(_first(r, keys) is not None
                                                             for r in rows)]
    share = any(r.get("fraction_of_limit") is not None for r in rows)
    head = ["case", "impl", "status", "time (ms)", "p20-p80 ms (n)", "setup/compile/measure s",
            *(h for h, _ in columns), *(["fraction of limit", "of"] if share else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["name"], r["impl"], status_text(r), *_time_cells(r),
                 *(_cell(_first(r, keys)) for _, keys in columns)]
        if share:
            cells += [_cell(r.get("fraction_of_limit")), r.get("limit") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(payload: dict) -> str:
    """results.md: what ran (device, backend, limits named once), then one table per suite."""
    meta = payload.get("meta") or {}
    limits = meta.get("limits") or {}
    backend = meta.get("backend", "auto")
    if meta.get("triton_interpreter"):
        backend += "; our Triton kernels in the interpreter (CPU times, not a GPU's)"
    world = meta.get("world_size") or 1
    ranks = f" x {world} ranks (torchrun; tok/s per GPU)" if world > 1 else ""
    lines = [f"# fusedrl bench: {meta.get('device')}{ranks}", "",
             f"Commit {meta.get('commit')}; torch {meta.get('torch')}; kernel backend {backend}; "
             f"packed attention {meta.get('attention', '-')}; "
             f"`{meta.get('command')}`; {meta.get('time_utc')}; "
             f"run {meta.get('ended', 'running')}.",
             "", f"Limits ({limits.get('label')}): "
             f"{(limits.get('flops_per_s') or 0) / 1e12:.3g} TFLOP/s, "
             f"{(limits.get('bytes_per_s') or 0) / 1e9:.3g} GB/s; each row's `fraction of limit` "
             f"is of the limit its `of` names; every figure is in results.json.", ""]
    for suite in SUITES:
        rows = [r for r in payload["rows"] if r["suite"] == suite]
        if rows:
            lines += [f"## {suite}", "", *suite_table(rows), ""]
    return "\n".join(lines)


def results_path(path: str) -> str:
    """`path` itself, or DIR/results.json for a directory (a run's output_dir)."""
    return os.path.join(path, "results.json") if os.path.isdir(path) else path


def load(path: str) -> dict:
    """A results.json (or a run's output_dir holding one), its schema checked: a clear one-line
    error naming the file otherwise. A missing or null `meta` is {}."""
    path = results_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable results.json ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise ValueError(f"{path}: expected an object with a list 'rows' "
                         f"(fusedrl bench's results.json)")
    if payload.get("meta") is None:
        payload["meta"] = {}
    if not isinstance(payload["meta"], dict):
        raise ValueError(f"{path}: 'meta' is {type(payload['meta']).__name__}, expected an "
                         f"object (fusedrl bench's results.json)")
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or not {"suite", "name", "impl"} <= set(row):
            raise ValueError(f"{path}: rows[{i}] lacks suite, name or impl")
    return payload


def _key(row: dict) -> tuple:
    return row["suite"], row["name"], row["impl"]


def _word_key(row: dict) -> tuple:
    return row["suite"], row["name"], row["impl"].split()[0] if row["impl"].split() else ""


def pairs(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """(A's row, B's row) for each row of B that matches one of A: by suite, name and impl; else,
    where one of the two impls is a single word (the name a case lists a peer by before it runs:
    a cut run's `trl`, not run, beside another run's measured `trl 1.16.0`), by that word, when it
    names one row of the case on each side."""
    index = {_key(r): r for r in a["rows"]}
    words_a, words_b = ({} for _ in range(2))
    for rows, words in ((a["rows"], words_a), (b["rows"], words_b)):
        for r in rows:
            words.setdefault(_word_key(r), []).append(r)
    out = []
    for row in b["rows"]:
        other = index.get(_key(row))
        if other is None:
            same_a, same_b = words_a.get(_word_key(row), []), words_b[_word_key(row)]
            if len(same_a) == 1 == len(same_b) and (" " not in same_a[0]["impl"]
                                                    or " " not in row["impl"]):
                other = same_a[0]
        if other is not None:
            out.append((other, row))
    return out


def compare(a: dict, b: dict) -> list[dict]:
    """Per pair of rows (`pairs`) and each figure both measured (finite in both, not zero in A):
    B / A."""
    out = []
    for other, row in pairs(a, b):
        fa, fb = figures(other), figures(row)
        for key in sorted(set(fa) & set(fb) - set(NOT_COLUMNS)):
            if not fa[key]:  # no ratio to a zero (0/0 or x/0): the figure is left out
                continue
            ratio = fb[key] / fa[key]
            if not math.isfinite(ratio):  # an overflow: no ratio either
                continue
            out.append({"suite": row["suite"], "name": row["name"], "impl": row["impl"],
                        "figure": key, "a": fa[key], "b": fb[key], "b_over_a": ratio})
    return out


def matching(a: dict, b: dict, ratios: list[dict]) -> dict:
    """How the rows of A and B pair up (`pairs`), given compare(a, b)'s `ratios`:
    `matched` (B's rows that match a row of A), `unmeasured` (the matched ones with no ratio:
    (suite, name, impl, A's status, B's status) each), `only_a` and `only_b` (how many rows of each
    match no row of the other)."""
    paired = pairs(a, b)
    measured = {_key(r) for r in ratios}
    unmeasured = [(*_key(row), status_text(other), status_text(row))
                  for other, row in paired if _key(row) not in measured]
    return {"matched": len(paired), "unmeasured": unmeasured,
            "only_a": len(a["rows"]) - len({id(other) for other, _ in paired}),
            "only_b": len(b["rows"]) - len(paired)}


def _columns(table: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _one_line(text) -> str:
    return " ".join(str(text).split()) or "-"


def compare_table(a_path: str, b_path: str) -> str:
    """The text `fusedrl bench compare A B` prints (A, B: results.json files or the directories
    holding them): both files' devices and commits and how their rows match, one line per shared
    figure with its ratio, then each matched row with no ratio (its status in A and in B, a count
    per pair of statuses first)."""
    a_path, b_path = results_path(a_path), results_path(b_path)
    a, b = load(a_path), load(b_path)
    rows = compare(a, b)
    match = matching(a, b, rows)
    lines = [f"A: {a_path} ({a['meta'].get('device')}, commit {a['meta'].get('commit')})",
             f"B: {b_path} ({b['meta'].get('device')}, commit {b['meta'].get('commit')})"]
    if not match["matched"]:
        return "\n".join([*lines, f"no row of B matches a row of A (suite, name, impl): "
                                   f"A has {_rows(len(a['rows']))}, B {_rows(len(b['rows']))}"])
    verb = "matches" if match["matched"] == 1 else "match"
    lines.append(f"{_rows(match['matched'])} of B {verb} a row of A (suite, name, impl); "
                 f"{_rows(match['only_a'])} of A and {_rows(match['only_b'])} of B match none")
    if rows:
        cols = ["suite", "name", "impl", "figure", "a", "b", "b_over_a"]
        table = [["suite", "name", "impl", "figure", "A", "B", "B/A"]]
        table += [[_cell(r[c]) for c in cols] for r in rows]
        lines += _columns(table)
    else:
        lines.append("no figure is measured in both files (a finite number, not 0 in A)")
    if match["unmeasured"]:
        counts: dict[tuple[str, str], int] = {}
        for *_, status_a, status_b in match["unmeasured"]:
            pair = _one_line(status_a), _one_line(status_b)
            counts[pair] = counts.get(pair, 0) + 1
        lines += ["", f"{_rows(len(match['unmeasured']))} matched, with no figure both measured:",
                  *(f"  {n}: A {sa} | B {sb}" for (sa, sb), n in counts.items())]
        table = [["suite", "name", "impl", "status in A", "status in B"]]
        table += [[_one_line(v) for v in r] for r in match["unmeasured"]]
        lines += _columns(table)
    return "\n".join(lines)
