"""The PNG charts beside results.json: each measured row's fraction of the limit, the rl suite's
time per phase, and ours against the peers (each case's time relative to ours). Written with
engine/train/plot.py's `write_png` (a new file or over an earlier fusedrl plot, nothing else)."""
from __future__ import annotations

from pathlib import Path

PHASES = ("generate", "score", "reference", "old", "train")
# A row's tokens per second, by the key its suite gives it under.
RATES = ("tok_s", "tokens_per_s_per_gpu")


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _label(row: dict) -> str:
    """The row's suite, case and implementation; the model's label (in parentheses) left to the
    table."""
    return f"{row['suite']}: {row['name'].split(' (')[0]} [{row['impl']}]"


def fraction_chart(plt, rows: list[dict]):
    rows = [r for r in _measured(rows) if r.get("fraction_of_limit") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(13, 0.3 * len(rows) + 1.5))
    ax.barh([_label(r) for r in rows], [r["fraction_of_limit"] for r in rows])
    ax.set_xlabel("fraction of the device's limit (see each row's `limit`)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    return fig


def phases_chart(plt, rows: list[dict]):
    rows = [r for r in _measured(rows) if r["suite"] == "rl"
            and any(f"time_{p}" in r for p in PHASES)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(13, 0.5 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for phase in PHASES:
        widths = [r.get(f"time_{phase}") or 0.0 for r in rows]
        ax.barh([_label(r) for r in rows], widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds per iteration")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.invert_yaxis()
    return fig


def peers_chart(plt, rows: list[dict]):
    """Each case with a peer: every implementation's cost over ours (below 1: faster), per token
    where each of the case's rows gives a rate (RATES; its rows may time different amounts of work:
    transformers' decode times fewer new tokens than ours), else per call (`seconds`)."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in _measured(rows):
        if r.get("seconds"):
            cases.setdefault((r["suite"], r["name"]), {})[r["impl"]] = r
    bars = [(f"{suite}: {name.split(' (')[0]} [{impl}]", cost / costs["fusedrl"])
            for (suite, name), impls in cases.items() if "fusedrl" in impls and len(impls) > 1
            for costs in [_costs(impls)] for impl, cost in costs.items()]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(13, 0.3 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("time (per token where the rows give tokens/s) relative to fusedrl "
                  "(log; above 1: slower than ours)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    return fig


def _costs(impls: dict[str, dict]) -> dict[str, float]:
    """impl -> seconds per token of each row, where every row of the case has a rate; else its
    seconds."""
    rates = {impl: next((r[k] for k in RATES if r.get(k)), None) for impl, r in impls.items()}
    if all(rates.values()):
        return {impl: 1.0 / rate for impl, rate in rates.items()}
    return {impl: r["seconds"] for impl, r in impls.items()}


def draw_charts(payload: dict, out_dir: str) -> list[str]:
    """fraction_of_limit.png, phases.png, peers.png in out_dir (each when it has rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusedrl.engine.train.plot import write_png
    written = []
    for name, draw in (("fraction_of_limit", fraction_chart), ("phases", phases_chart),
                       ("peers", peers_chart)):
        fig = draw(plt, payload["rows"])
        if fig is None:
            continue
        fig.tight_layout()
        path = Path(out_dir) / f"{name}.png"
        write_png(fig, path)
        plt.close(fig)
        written.append(str(path))
    return written
