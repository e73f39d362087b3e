"""`fusedrl bench` writes as it measures: the headline set's first row lands in results.jsonl
within 60 s of the command's start (2 CPU cores, --quick), SIGTERM halfway leaves a valid
results.json with every finished row, the run's deadline turns what does not fit into rows saying
`not run: time` and a case's budget bounds its repetitions; every timing has its spread; the table
has only the columns a suite's rows fill; compare never divides by zero."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fusedrl.bench import devices, results, timing
from fusedrl.engine.cli import main

FIXED = devices.Limits("CPU (test)", 1e11, 1e10, "measured")


@pytest.mark.integration
def test_headline_first_row_lands_within_60_s_and_sigterm_keeps_every_finished_row(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    run = subprocess.Popen([sys.executable, "-m", "fusedrl.engine.cli", "bench", "headline",
                            "--quick", f"output_dir={out}"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "TRITON_INTERPRET": "0"})
    streamed = out / "results.jsonl"
    try:
        while time.monotonic() - start < 120 and run.poll() is None:
            if streamed.exists() and len(streamed.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        first_row_s = time.monotonic() - start
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=120)
    finally:
        run.kill()
    assert first_row_s < 60, (first_row_s, output[-2000:])
    payload = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in streamed.read_text().splitlines()]
    assert payload["meta"]["ended"] == "interrupted" and run.returncode == 130, output[-2000:]
    assert len(payload["rows"]) == len(rows) >= 2 and rows[0]["elapsed_s"] < 60
    assert rows[0]["suite"] == "headline" and rows[0]["name"].startswith("decode batch 1")
    for row in rows:
        assert row["status"] == "ok" and row["n"] >= 1 and row["measure_s"] > 0, row
    # one progress line per row: case, implementation, elapsed, what is left
    progress = [line for line in output.splitlines() if line.startswith("[")]
    assert len(progress) >= len(rows) and "cases left" in progress[0], output[-2000:]


def test_a_case_past_its_budget_times_one_call_and_past_the_deadline_says_not_run_time(
        tmp_path, monkeypatch, capsys):
    """The budget bounds a case's repetitions (its setup and compile may outlast it: the first
    measurement still comes); the run's deadline stops cases."""
    monkeypatch.setattr(devices, "device_limits", lambda device: FIXED)
    out = tmp_path / "budget"
    assert main(["bench", "train", "--quick", "row_seconds=0.001", f"output_dir={out}"]) == 0
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"]
            if r["impl"] != "fusedrl CUDA graph"]  # not run on the CPU
    assert rows and all(r["status"] == "ok" and r["n"] == 1 for r in rows), rows
    out = tmp_path / "deadline"
    assert main(["bench", "rl", "--quick", "max_minutes=0.0001", f"output_dir={out}"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"fusedrl", "trl"} and len(rows) == 4
    assert all(r["status"] == "not run: time (the run's deadline)" for r in rows), rows
    assert "cases left" in capsys.readouterr().out


def test_a_timing_carries_its_spread():
    t = timing.Timing.of([0.5, 0.1, 0.2, 0.3, 0.4])
    assert (t.median_s, t.n, t.best_s) == (0.3, 5, 0.1)
    assert 0.1 < t.p20_s < t.median_s < t.p80_s < 0.5
    one = timing.Timing.of([0.25])
    assert one.p20_s == one.median_s == one.p80_s == 0.25 and one.n == 1
    with timing.ledger() as book:
        measured = timing.measure(lambda: torch.ones(8).sum(), torch.device("cpu"),
                                  min_reps=4, budget_s=0.0)
        with timing.warm_up():
            pass
    assert book.timings == [measured] and measured.n == 4 and len(book.warmups_s) == 1
    assert book.matching(measured.median_s) is measured and book.matching(1e6) is None


def _payload(rows):
    meta = {"device": "cpu", "commit": "c", "limits": FIXED.as_dict(), "command": "x",
            "backend": "torch", "triton_interpreter": False}
    return {"meta": meta, "rows": rows}


def test_the_table_has_only_the_columns_its_rows_fill_with_units_and_the_limit_once():
    row = results.make_row("kernels", "gae fwd 4x8", "fusedrl", fraction_of_limit=0.5,
                           limit="memory bandwidth", seconds=0.002, seconds_p20=0.001,
                           seconds_p80=0.003, n=9, setup_s=0.1, compile_s=0.2, measure_s=0.3,
                           gbps=5.0)
    text = results.markdown(_payload([row]))
    header = next(line for line in text.splitlines() if line.startswith("| case"))
    assert header.split(" | ")[3:] == ["time (ms)", "p20-p80 ms (n)", "setup/compile/measure s",
                                       "GB/s", "fraction of limit", "of |"], header
    assert "| 2 | 1-3 (9) | 0.1/0.2/0.3 | 5 | 0.5 | memory bandwidth |" in text
    assert text.count("CPU (test)") == 1


def test_compare_leaves_out_a_ratio_to_zero(tmp_path, capsys):
    a = results.make_row("rl", "grpo", "fusedrl", fraction_of_limit=0.1, limit="FLOP/s",
                         seconds=2.0, weight_copies=0, weight_sync_s=0.0)
    b = dict(a, seconds=1.0)
    for name, row in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(_payload([row])))
    text = results.compare_table(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert "nan" not in text and "inf" not in text and "weight_copies" not in text
    assert any(line.split()[-1] == "0.5" for line in text.splitlines() if "seconds" in line)
