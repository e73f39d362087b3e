"""One result schema for every suite, and what is made of it: `results.json`, `results.md`, the
comparison of two result files.

    {"meta": {"device", "driver", "limits", "versions", "commit", "command", "time_utc",
              "backend", "triton_interpreter", "attention", "ended", ...},
     "rows": [{"suite": "headline" | "kernels" | "generate" | "train" | "rl", "name", "impl",
               "status", "fraction_of_limit", "limit", "seconds", "seconds_p20", "seconds_p80",
               "n", "setup_s", "compile_s", "measure_s", <figures>}, ...]}

A row is one implementation (ours or a peer, named with its version) of one case; `status` is
"ok", "not installed" or the error that stopped it, and a row that did not run has no figures:
nothing is made up for a missing peer. `fraction_of_limit` is the row's share of the device's
limit named by `limit` (devices.py): bandwidth for memory-bound work, FLOP/s for the rest, the
decode roofline for generation. Torch-free: `fusedrl bench compare` reads files only.
"""
from __future__ import annotations

import json

from .options import SUITES

# The status of a row that replays a CUDA graph, on a device without CUDA.
NO_CUDA_GRAPHS = "not run: CUDA graphs need a CUDA device"
# A row's keys that are not figures (compare and the table treat them apart).
LABELS = ("suite", "name", "impl", "status", "limit", "peer_version", "note")
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


def figures(row: dict) -> dict:
    """The row's numeric figures, fraction_of_limit included."""
    return {k: v for k, v in row.items() if k not in LABELS and isinstance(v, (int, float))
            and not isinstance(v, bool) and v is not None}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# The table's figure columns (header with its unit, the row keys that fill it, first found): the
# rest of a row's figures are in results.json.
COLUMNS = (("tok/s", ("tok_s", "tokens_per_s", "tokens_per_s_per_gpu")),
           ("tok/s, all GPUs", ("tokens_per_s_total",)),
           ("GB/s", ("gbps",)), ("peak (MiB)", ("peak_extra_mib",)),
           ("peak (GiB)", ("peak_gib", "process_peak_rss_gib")), ("plan peak (GiB)",
                                                                 ("plan_peak_gib",)))


def _time_cells(row: dict) -> list[str]:
    """time (ms), p20-p80 (n), and setup / compile / measure seconds."""
    if row.get("seconds") is None:
        return ["-", "-", "-"]
    spread = (f"{row['seconds_p20'] * 1e3:.3g}-{row['seconds_p80'] * 1e3:.3g} ({row['n']})"
              if "seconds_p20" in row else "-")
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
        cells = [r["name"], r["impl"], r["status"], *_time_cells(r),
                 *(_cell(_first(r, keys)) for _, keys in columns)]
        if share:
            cells += [_cell(r.get("fraction_of_limit")), r.get("limit") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(payload: dict) -> str:
    """results.md: what ran (device, backend, limits named once), then one table per suite."""
    meta = payload["meta"]
    limits = meta.get("limits", {})
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


def load(path: str) -> dict:
    """A results.json, its schema checked: a clear one-line error naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable results.json ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list) \
            or "meta" not in payload:
        raise ValueError(f"{path}: expected an object with 'meta' and a list 'rows' "
                         f"(fusedrl bench's results.json)")
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or not {"suite", "name", "impl"} <= set(row):
            raise ValueError(f"{path}: rows[{i}] lacks suite, name or impl")
    return payload


def compare(a: dict, b: dict) -> list[dict]:
    """Per row present in both (by suite, name, impl) and each figure both measured: B / A."""
    index = {(r["suite"], r["name"], r["impl"]): r for r in a["rows"]}
    out = []
    for row in b["rows"]:
        other = index.get((row["suite"], row["name"], row["impl"]))
        if other is None:
            continue
        fa, fb = figures(other), figures(row)
        for key in sorted(set(fa) & set(fb) - set(NOT_COLUMNS)):
            if not fa[key]:  # no ratio to a zero (0/0 or x/0): the figure is left out
                continue
            ratio = fb[key] / fa[key]
            out.append({"suite": row["suite"], "name": row["name"], "impl": row["impl"],
                        "figure": key, "a": fa[key], "b": fb[key], "b_over_a": ratio})
    return out


def compare_table(a_path: str, b_path: str) -> str:
    """The text `fusedrl bench compare A B` prints: both files' devices and commits, then one line
    per shared figure with its ratio."""
    a, b = load(a_path), load(b_path)
    rows = compare(a, b)
    head = (f"A: {a_path} ({a['meta'].get('device')}, commit {a['meta'].get('commit')})\n"
            f"B: {b_path} ({b['meta'].get('device')}, commit {b['meta'].get('commit')})\n")
    if not rows:
        return head + "no row of B matches a row of A (suite, name, impl)"
    cols = ["suite", "name", "impl", "figure", "a", "b", "b_over_a"]
    table = [["suite", "name", "impl", "figure", "A", "B", "B/A"]]
    table += [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return head + "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths))
                            for line in table)
