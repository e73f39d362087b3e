"""The generate suite's vision-language rollout row under --quick: ours and transformers' rows, each
with its tokens/s, the tower's seconds and share, the tower run once per prompt on our side, and
the spread and phases every row holds. Times are reported, never checked."""
import pytest
import torch

from fusedrl.bench import bench_vlm_rollout, devices
from fusedrl.bench.cases import run_case
from fusedrl.bench.context import Context
from fusedrl.bench.options import BenchOptions
from fusedrl.bench.suites import generate


@pytest.fixture(scope="module")
def rows():
    limits = devices.Limits("test CPU", flops_per_s=1e11, bytes_per_s=2e10, source="measured")
    ctx = Context(torch.device("cpu"), limits, BenchOptions(quick=True))
    out = []
    run_case(generate.vlm_case(ctx), None, out.append)
    return out


def test_ours_and_transformers_rows_hold_the_rollout_figures(rows):
    r = bench_vlm_rollout.QUICK
    assert [row["impl"].split()[0] for row in rows] == ["fusedrl", "transformers"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["output_tokens"] == r.prompts * r.samples * r.new_tokens
        assert row["tok_s"] == pytest.approx(row["output_tokens"] / row["seconds"])
        assert row["tower_s"] > 0 and 0 < row["tower_share"] < 1
        assert row["seconds_p20"] <= row["seconds"] <= row["seconds_p80"] and row["n"] == 3
        assert all(row[k] >= 0 for k in ("setup_s", "compile_s", "measure_s"))
        assert row["compile_s"] > 0 and 0 < row["fraction_of_limit"] < 1
    assert rows[0]["tower_runs"] == r.prompts  # once per prompt, its n samples sharing it


def test_the_prompts_hold_one_image_of_placeholders_each():
    config = bench_vlm_rollout.vlm_config(quick=True)
    r = bench_vlm_rollout.QUICK
    ids, images = bench_vlm_rollout.prompts(config, r, seed=0)
    t, h, w = r.grid
    assert len(ids) == len(images) == r.prompts
    for prompt, image in zip(ids, images):
        assert prompt.count(config.image_token_id) == t * h * w // 4
        assert prompt[0] == config.vision_start_token_id
        assert len(prompt) == t * h * w // 4 + 2 + r.text_tokens
        assert image.pixel_values.shape[0] == t * h * w and image.num_images == 1
