"""bench/tune_decode.py: its rows (a tiny shape under the interpreter) and how it reports a launch
shape that is wrong, fails or comes past the deadline (never as a timing)."""
import dataclasses
import json
import time

import pytest
import torch

from fusedrl.bench import tune_decode
from fusedrl.kernels.model.norm_linear import Tiles, tile_shape
from kernel_testing import needs_triton


@needs_triton
def test_quick_run_times_each_projection_and_split_beside_cublas(tmp_path):
    rows = tune_decode.run(tmp_path, quick=True, seconds=600)
    lines = (tmp_path / "tune_decode.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["meta"]["shape"]["hidden"] == tune_decode.QUICK.hidden
    assert [json.loads(line) for line in lines[1:]] == rows
    for name, width, *_, glu, fused in tune_decode.projections(tune_decode.QUICK):
        case = [r for r in rows if r["case"] == name]
        assert [r["way"] for r in case] == ["cuBLAS", "norm_linear", "norm_linear"]
        # what the engine's unfused decode runs: o and down are cuBLAS's GEMM alone
        assert case[0]["launch"] == ("norm kernel + GEMM" if fused else "GEMM") + (
            " + SiLU * up" if glu else "")
        default = tile_shape(1, width // 2 if glu else width)
        assert case[1]["tiles"] == default._asdict() and case[1]["default"]
        assert case[2]["tiles"] != default._asdict() and not case[2]["default"]
        assert case[1]["vs_default"] == 1.0
        assert all(r["us"] > 0 and r["n"] >= 1 and r["us_p20"] <= r["us_p80"] for r in case)
    decode = [r for r in rows if r["way"] == "paged decode"]
    assert [r["default"] for r in decode] == [True, False] and decode[0]["vs_default"] == 1.0
    assert len({r["splits"] for r in decode}) == 2 and all(r["us"] > 0 for r in decode)
    table = (tmp_path / "tune_decode.md").read_text()
    assert table.count("\n| ") == len(rows) + 2  # the header, its rule, one line a row


def _sweep(deadline: float) -> tune_decode.Sweep:
    return tune_decode.Sweep(torch.device("cpu"), torch.float32, 1, 0.0, deadline, 1e9)


def test_a_wrong_or_failing_launch_is_a_status_not_a_timing(tmp_path):
    writer = tune_decode.Writer(tmp_path, {"device": "cpu", "git_commit": "x", "reps": 1,
                                           "limit": "1 GB/s"})
    default, wrong, failing, other = (Tiles(16, 16, 128), Tiles(16, 16, 256, 4, 3),
                                      Tiles(16, 32, 128, 4, 4), Tiles(16, 16, 64, 4, 6))
    x = torch.ones(4)

    def call(tiles, weight):
        if tiles == failing:
            raise RuntimeError("out of resource: shared memory")
        return x + (1 if tiles == wrong else 0)

    def row(way, launch_label, **extra):
        return {"case": "q/k/v", "rows": 1, "way": way, "launch": launch_label, **extra}
    baseline = tune_decode.timing.Timing.of([1e-3])
    tune_decode.tile_rows(_sweep(time.perf_counter() + 600), writer,
                          [default, wrong, failing, other], row, baseline, 1000, call, [x])
    status = [r.get("status") for r in writer.rows]
    assert status[0] is None and status[3] is None
    assert status[1] == "wrong: differs from the default"
    assert status[2] == "failed: RuntimeError: out of resource: shared memory"
    assert "us" not in writer.rows[1] and "us" not in writer.rows[2]
    assert writer.rows[0]["default"] and not writer.rows[3]["default"]


def test_rows_past_the_deadline_say_so(tmp_path):
    writer = tune_decode.Writer(tmp_path, {"device": "cpu", "git_commit": "x", "reps": 1,
                                           "limit": "1 GB/s"})

    def row(way, launch_label, **extra):
        return {"case": "o", "rows": 1, "way": way, "launch": launch_label, **extra}
    tune_decode.tile_rows(_sweep(time.perf_counter() - 1), writer, [Tiles(16, 16, 128)], row,
                          None, 1000, pytest.fail, [torch.ones(1)])
    assert [r["status"] for r in writer.rows] == ["not run: time"]
    assert "| o | 1 | norm_linear | 16x16x128 | not run: time |" in (
        tmp_path / "tune_decode.md").read_text()


def test_a_projection_or_a_split_sweep_past_the_deadline_writes_every_row_it_would_have(tmp_path):
    """Each of its rows (the cuBLAS one, each candidate, each split count) says `not run: time`,
    and no operand is made for it (a batch-256 sweep's pages are ~170 MB)."""
    writer = tune_decode.Writer(tmp_path, {"device": "cpu", "git_commit": "x", "reps": 1,
                                           "limit": "1 GB/s"})
    sweep = dataclasses.replace(_sweep(time.perf_counter() - 1), quick=False)
    tune_decode.gemv_rows(tune_decode.QWEN_05B, 1, sweep, writer)
    tune_decode.decode_rows(tune_decode.QWEN_05B, 256, sweep, writer)
    expected = sum(1 + len(tune_decode.candidates(1, n // 2 if glu else n))
                   for _, n, _, _, glu, _ in tune_decode.projections(tune_decode.QWEN_05B))
    splits = [r for r in writer.rows if r["way"] == "paged decode"]
    assert len(writer.rows) - len(splits) == expected
    assert len(splits) == len(tune_decode.SPLITS) and sum(r["default"] for r in splits) == 1
    assert all(r["status"] == "not run: time" and "us" not in r for r in writer.rows)


def test_candidates_start_at_the_default_and_change_one_class_of_knob_each():
    for rows, width in ((1, 1152), (1, 4864), (256, 896)):
        options = tune_decode.candidates(rows, width)
        assert options[0] == tile_shape(rows, width)
        assert len(set(options)) == len(options)
        assert all(t.num_warps and t.num_stages for t in options[1:])
        if rows == 1:  # a GEMV by default, the tensor-core tiles of 2-16 rows among the others
            assert options[0].block_m == 1
            assert tile_shape(2, width)[:3] in [t[:3] for t in options[1:]]
