"""The peers chart (bench/charts.py) sets each implementation beside ours by the same measure: per
token where every row of the case gives a rate (rows may time different amounts of work), else per
call."""
from __future__ import annotations

from types import SimpleNamespace

from fusedrl.bench.charts import peers_chart


class Recorder:
    """What peers_chart draws: the bars' labels and lengths."""

    def __init__(self):
        self.bars = None

    def subplots(self, figsize):
        ax = SimpleNamespace(barh=lambda labels, widths: setattr(self, "bars", dict(zip(labels,
                                                                                      widths))),
                             axvline=lambda *a, **k: None, set_xscale=lambda *a: None,
                             set_xlabel=lambda *a: None, invert_yaxis=lambda: None,
                             tick_params=lambda **k: None)
        return object(), ax


def row(name, impl, seconds, **figures):
    return {"suite": "headline", "name": name, "impl": impl, "status": "ok", "seconds": seconds,
            **figures}


def test_rows_with_rates_compare_per_token_others_per_call():
    rows = [row("decode batch 1 (x)", "fusedrl", 128.0, tok_s=4.0),  # 512 new tokens
            row("decode batch 1 (x)", "transformers", 22.0, tok_s=2.9),  # 64 new tokens
            row("kl (y)", "fusedrl", 2.0), row("kl (y)", "eager", 6.0)]
    plt = Recorder()
    peers_chart(plt, rows)
    bars = plt.bars
    # slower per token (not 6x faster by the calls' seconds)
    assert abs(bars["headline: decode batch 1 [transformers]"] - 4.0 / 2.9) < 1e-9
    assert bars["headline: kl [eager]"] == 3.0 and bars["headline: kl [fusedrl]"] == 1.0
