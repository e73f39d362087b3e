"""`fusedrl demo task=vision`: its task (pictures, judge, reward), its data in TRL's vision format,
its config, and the whole demo on a very short setting."""
import json
import random

import pytest

from fusedrl.engine import cli
from fusedrl.engine.config.demo import DemoConfig
from fusedrl.engine.demos.vision_task import (CELL_PIXELS, COLOURS, EMPTY, count_reward, draw,
                                              is_correct, make_tasks, write_vision_data)


def test_pictures_hold_the_squares_they_count():
    cells = ["red", None, "blue", None, None, "green"]
    image = draw(cells)
    assert image.size == (3 * CELL_PIXELS, 2 * CELL_PIXELS)
    centre = CELL_PIXELS // 2
    for i, colour in enumerate(cells):
        x, y = (i % 3) * CELL_PIXELS + centre, (i // 3) * CELL_PIXELS + centre
        assert image.getpixel((x, y)) == (EMPTY if colour is None else COLOURS[colour])


def test_tasks_are_distinct_and_held_out_ones_new():
    rng = random.Random(0)
    train = make_tasks(300, rng)
    held_out = make_tasks(50, rng, exclude={t["cells"] for t in train})
    assert len({t["cells"] for t in train}) == 300
    assert not {t["cells"] for t in train} & {t["cells"] for t in held_out}
    assert all(t["answer"] == sum(c is not None for c in t["cells"]) for t in train)
    with pytest.raises(ValueError, match="only 4096 are left"):
        make_tasks(5000, rng)


def test_the_reward_judges_trl_completions():
    completions = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "2"}],
                   "4", [{"role": "assistant", "content": "3 3"}]]
    assert count_reward(completions, [3, 3, 4, 3]) == [1.0, 0.0, 1.0, 0.0]
    assert is_correct(0, " 0 ") and not is_correct(0, "")


def test_data_rows_are_trl_vision_rows(tmp_path):
    data = write_vision_data(20, 5, 0.5, 0, tmp_path)
    sft = [json.loads(line) for line in open(data["sft"])]
    prompts = [json.loads(line) for line in open(data["prompts"])]
    assert len(sft) == len(prompts) == 20 and len(data["held_out"]) == 5
    for row in sft + prompts:
        assert row["prompt"][0]["content"][0] == {"type": "image"}
        assert (tmp_path / row["images"][0]).is_file()
    wrong = sum(int(s["completion"]) != p["answer"] for s, p in zip(sft, prompts))
    assert 0 < wrong < 20  # noise 0.5: some demonstrations are wrong, not all


def test_config_defaults():
    vision = DemoConfig(task="vision")
    assert (vision.sft_epochs, vision.algo, vision.rl_iterations, vision.train_prompts) == (
        8, "grpo", 60, 600)
    assert vision.output_dir == "fusedrl-demo-vision" and DemoConfig().train_prompts == 2000


@pytest.mark.integration
def test_vision_demo_end_to_end(tmp_path, capsys, cpu_user_backend, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fusedrl-demo-vision"
    assert cli.main(["demo", "task=vision", "train_prompts=16", "eval_prompts=2", "sft_epochs=1",
                     "rl_iterations=1", "rl_prompts=2", "eval_samples=2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "GRPO accuracy (held-out, sampled)" in printed and "GRPO gain over SFT" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "vision" and 0 <= results["rl_accuracy"] <= 1
    assert list(results["stage_seconds"]) == ["setup", "sft", "evaluations", "rl"]
    assert "time by stage" in printed and "GRPO " in printed.split("time by stage")[1]
    assert (out / "rl" / "final" / "preprocessor_config.json").is_file()
