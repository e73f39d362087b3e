"""`fusedrl bench` writes as it measures: the headline set's first row lands in results.jsonl
within 60 s of the command's start (2 CPU cores, --quick), SIGTERM halfway leaves a valid
results.json with every finished row, the run's deadline turns what does not fit into rows saying
`not run: time` and a case's budget bounds its repetitions; every timing has its spread; the table
has only the columns a suite's rows fill, the process's resident set in a column of its own; a
figure that is not finite is recorded as null (standard JSON) and named; compare never divides by
zero, never prints a NaN, lists the matched rows it has no figure for and reads a run's
directory."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fusedrl.bench import devices, record, results, timing
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


def _strict_json(text: str):
    """json.loads refusing NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not standard JSON")
    return json.loads(text, parse_constant=refuse)


def test_record_writes_a_not_finite_figure_as_null_and_names_it(tmp_path, capsys):
    out = tmp_path / "run"
    recorder = record.Recorder(str(out), _payload([])["meta"])
    recorder.add(results.make_row("kernels", "gae fwd 4x8", "fusedrl", fraction_of_limit=0.5,
                                  limit="memory bandwidth", seconds=float("nan"),
                                  gbps=float("inf"), loss=1.5), "1 case left")
    recorder.add(results.make_row("kernels", "gae bwd 4x8", "fusedrl", fraction_of_limit=0.25,
                                  limit="memory bandwidth", seconds=0.004), "0 cases left")
    recorder.close("interrupted")  # a complete run would draw its charts too
    payload = _strict_json((out / "results.json").read_text())
    streamed = [_strict_json(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for rows in (payload["rows"], streamed):
        bad, good = rows
        assert bad["seconds"] is None and bad["gbps"] is None and bad["loss"] == 1.5, bad
        assert bad["not_finite"] == ["seconds", "gbps"] and bad["status"] == "ok", bad
        assert good["seconds"] == 0.004 and "not_finite" not in good, good
    table = (out / "results.md").read_text()
    assert "nan" not in table.lower() and "| ok (not finite: seconds, gbps) |" in table, table
    progress = capsys.readouterr().out.splitlines()
    assert "not finite: seconds, gbps" in progress[0] and "nan" not in progress[0], progress


def _write(path, rows, meta):
    path.write_text(json.dumps({"meta": meta, "rows": rows}))  # a NaN written as NaN


def test_compare_skips_a_not_finite_figure_in_either_file(tmp_path):
    a = results.make_row("kernels", "gae fwd 4x8", "fusedrl", fraction_of_limit=0.5,
                         limit="memory bandwidth", seconds=float("nan"), gbps=4.0, loss=2.0)
    b = dict(a, seconds=0.001, gbps=8.0, loss=float("inf"))
    _write(tmp_path / "a.json", [a], _payload([])["meta"])  # NaN literals, as a file may hold
    _write(tmp_path / "b.json", [b], _payload([])["meta"])
    text = results.compare_table(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    lowered = text.lower()
    assert "nan" not in lowered and "inf" not in lowered, text
    figures = [line.split()[-4] for line in text.splitlines() if line.startswith("kernels")]
    assert figures == ["fraction_of_limit", "gbps"], text
    assert any(line.split()[-1] == "2" for line in text.splitlines() if "gbps" in line), text


def test_compare_lists_matched_rows_without_figures_and_counts_the_unmatched(tmp_path):
    """A run cut by its deadline matches every row of a complete one: each is listed with its
    status, not reported as matching nothing; rows with no partner are counted."""
    measured = [results.make_row("rl", f"grpo {i}", "fusedrl", fraction_of_limit=0.1,
                                 limit="model FLOP/s", seconds=1.0 + i) for i in range(3)]
    cut = [results.missing_row("rl", r["name"], "fusedrl", "not run: time (the run's deadline)",
                               "model FLOP/s") for r in measured]
    a_only = results.make_row("train", "128 tokens", "fusedrl", fraction_of_limit=0.2,
                              limit="model FLOP/s", seconds=0.5)
    b_only = [results.missing_row("kernels", f"gae {i}", "eager", "not installed", "bandwidth")
              for i in range(2)]
    _write(tmp_path / "a.json", [*measured, a_only], _payload([])["meta"])
    _write(tmp_path / "b.json", [*cut, *b_only], _payload([])["meta"])
    text = results.compare_table(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert "no row of B matches" not in text, text
    assert "3 rows of B match a row of A" in text, text
    assert "1 row of A and 2 rows of B match none" in text, text
    assert "  3: A ok | B not run: time (the run's deadline)" in text, text
    for row in measured:
        assert any(line.split()[:3] == ["rl", "grpo", row["name"].split()[1]]
                   and line.endswith("not run: time (the run's deadline)")
                   for line in text.splitlines()), text
    # a row that failed in one file sits under the ratios of the rows both measured
    failed = dict(measured[1], status="RuntimeError: CUDA out of memory", seconds=None,
                  fraction_of_limit=None)
    _write(tmp_path / "b.json", [dict(measured[0], seconds=2.0), failed], _payload([])["meta"])
    text = results.compare_table(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert any(line.split()[-1] == "2" for line in text.splitlines() if "seconds" in line), text
    assert "  1: A ok | B RuntimeError: CUDA out of memory" in text, text
    assert "2 rows of B match a row of A" in text and "2 rows of A and 0 rows of B" in text, text


def test_compare_pairs_a_peer_listed_by_its_first_word_with_its_measured_row(tmp_path):
    """A cut run lists a peer it did not reach by the case's name for it (`trl`); a run that
    measured it names it in full (`trl 1.16.0`): the two pair, and so do a CUDA twin's rows;
    two rows of one word on a side (fusedrl, fusedrl CUDA graph) pair only by their full names."""
    def measured(impl, seconds):
        return results.make_row("rl", "grpo", impl, fraction_of_limit=0.1, limit="FLOP/s",
                                seconds=seconds)
    full = [measured("fusedrl", 1.0), measured("fusedrl CUDA graph", 0.5),
            measured("trl 1.16.0", 4.0)]
    cut = [measured("fusedrl", 2.0),
           *(results.missing_row("rl", "grpo", impl, "not run: time (the run's deadline)",
                                 "FLOP/s") for impl in ("fusedrl CUDA graph", "trl"))]
    _write(tmp_path / "a.json", full, _payload([])["meta"])
    _write(tmp_path / "b.json", cut, _payload([])["meta"])
    text = results.compare_table(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert "3 rows of B match a row of A" in text and "0 rows of A and 0 rows of B" in text, text
    assert "  2: A ok | B not run: time (the run's deadline)" in text, text
    assert any(line.split()[:3] == ["rl", "grpo", "trl"] for line in text.splitlines()), text
    pairs = {(a["impl"], b["impl"]) for a, b in results.pairs(
        {"rows": full}, {"rows": cut})}
    assert pairs == {("fusedrl", "fusedrl"), ("fusedrl CUDA graph", "fusedrl CUDA graph"),
                     ("trl 1.16.0", "trl")}
    # two trl rows in A (two versions): which one the cut run meant is unknown, none pairs
    two = [*full, measured("trl 0.29.1", 5.0)]
    assert ("trl 1.16.0", "trl") not in {(a["impl"], b["impl"]) for a, b in results.pairs(
        {"rows": two}, {"rows": cut})}


def test_compare_reads_a_run_directory_and_a_null_meta(tmp_path, capsys):
    row = results.make_row("rl", "grpo", "fusedrl", fraction_of_limit=0.1, limit="FLOP/s",
                           seconds=2.0)
    (tmp_path / "run").mkdir()
    _write(tmp_path / "run" / "results.json", [row], _payload([])["meta"])
    _write(tmp_path / "null_meta.json", [dict(row, seconds=1.0)], None)
    assert json.loads((tmp_path / "null_meta.json").read_text())["meta"] is None
    capsys.readouterr()
    assert main(["bench", "compare", str(tmp_path / "run"), str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"A: {tmp_path / 'run' / 'results.json'} (cpu, commit c)" in out, out
    assert any(line.split()[-1] == "1" for line in out.splitlines() if "seconds" in line), out
    assert main(["bench", "compare", str(tmp_path / "run"), str(tmp_path / "null_meta.json")]) == 0
    out = capsys.readouterr().out
    assert "(None, commit None)" in out, out
    assert any(line.split()[-1] == "0.5" for line in out.splitlines() if "seconds" in line), out


def test_results_table_gives_the_process_rss_its_own_column_beside_no_plan():
    """On the CPU the rl row has the process's resident-set high-water mark (monotonic over a
    run), not a peak of its own: a column of its own, never the `peak (GiB)` the plan sits by."""
    cpu = results.make_row("rl", "grpo", "fusedrl", fraction_of_limit=0.1, limit="FLOP/s",
                           seconds=2.0, plan_peak_gib=0.00302, process_peak_rss_gib=0.604)
    header = next(line for line in results.suite_table([cpu]) if line.startswith("| case"))
    heads = header.strip("| ").split(" | ")
    assert "peak (GiB)" not in heads and "plan peak (GiB)" in heads, heads
    rss = next(h for h in heads if "process" in h)
    assert "RSS high-water mark" in rss and "not the row's" in rss, rss
    cells = results.suite_table([cpu])[2].strip("| ").split(" | ")
    assert cells[heads.index(rss)] == "0.604" and cells[heads.index("plan peak (GiB)")] == "0.00302"
    gpu = dict(cpu, peak_gib=2.5)
    del gpu["process_peak_rss_gib"]
    lines = results.suite_table([gpu, cpu])
    heads = lines[0].strip("| ").split(" | ")
    peak, plan = heads.index("peak (GiB)"), heads.index("plan peak (GiB)")
    assert plan == peak + 1 and any("process" in h for h in heads), heads
    assert [line.strip("| ").split(" | ")[peak] for line in lines[2:]] == ["2.5", "-"], lines
