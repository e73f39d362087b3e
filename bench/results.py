"""One result schema for every suite, and what is made of it: `results.json`, `results.md`, the
comparison of two result files.

    {"meta": {"device", "driver", "limits", "versions", "commit", "command", "time_utc", ...},
     "rows": [{"suite": "kernels" | "generate" | "train" | "rl", "name", "impl", "status",
               "fraction_of_limit", "limit", <figures>}, ...]}

A row is one implementation (ours or a peer, named with its version) of one case; `status` is
"ok", "not installed" or the error that stopped it, and a row that did not run has no figures:
nothing is made up for a missing peer. `fraction_of_limit` is the row's share of the device's
limit named by `limit` (devices.py): bandwidth for memory-bound work, FLOP/s for the rest, the
decode roofline for generation. Torch-free: `fusedrl bench compare` reads files only.
"""
from __future__ import annotations

import json
import math
import os

SUITES = ("kernels", "generate", "train", "rl")
# A row's keys that are not figures (compare and the table treat them apart).
LABELS = ("suite", "name", "impl", "status", "limit", "peer_version", "note")


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


# The table's figure columns, in order: the ones most rows carry.
MAIN_FIGURES = ("ms", "tokens_per_s", "tok_s", "gbps", "peak_mib", "fraction_of_limit")


def markdown(payload: dict) -> str:
    """results.md: the meta line, then one table per suite (its rows' figures as columns)."""
    meta = payload["meta"]
    lines = [f"# fusedrl bench: {meta.get('device')}", "",
             f"Commit {meta.get('commit')}; limits: {meta.get('limits', {}).get('label')}; "
             f"torch {meta.get('torch')}; `{meta.get('command')}`; {meta.get('time_utc')}.", ""]
    for suite in SUITES:
        rows = [r for r in payload["rows"] if r["suite"] == suite]
        if not rows:
            continue
        keys = sorted({k for r in rows for k in figures(r)},
                      key=lambda k: (MAIN_FIGURES.index(k) if k in MAIN_FIGURES else -1, k))
        keys = [k for k in keys if k != "fraction_of_limit"] + ["fraction_of_limit"]
        head = ["name", "impl", "status", *keys, "limit"]
        lines += [f"## {suite}", "", "| " + " | ".join(head) + " |",
                  "|" + " --- |" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in head) + " |")
        lines.append("")
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
        for key in sorted(set(fa) & set(fb)):
            ratio = fb[key] / fa[key] if fa[key] else math.nan
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


def write(out_dir: str, payload: dict) -> list[str]:
    """results.json (written, then renamed: never half-written), results.md and the charts into
    out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(payload))
    from .charts import draw_charts
    return [path, md, *draw_charts(payload, out_dir)]
