"""bench/bench_vlm_grpo.py: its `fusedrl grpo` command line is a valid GRPO config of the demo's
recipe on the fresh task's prompts, and the fresh task's data counts only the red squares."""
import json
from pathlib import Path

from fusedrl.bench import bench_vlm_grpo
from fusedrl.engine.config.demo import DemoConfig
from fusedrl.engine.config.io import apply_overrides, from_dict
from fusedrl.engine.config.ppo import GRPOConfig
from fusedrl.engine.demos.vision_task import write_vision_data


def test_the_command_line_is_the_demos_grpo_recipe(tmp_path):
    cfg = DemoConfig(task="vision")
    argv = bench_vlm_grpo.grpo_command("sft", "prompts.jsonl", tmp_path / "rl", cfg, "cpu")
    assert argv[1:4] == ["-m", "fusedrl.engine.cli", "grpo"]
    config = from_dict(GRPOConfig, apply_overrides({}, argv[4:]))
    assert (config.policy, config.prompts_file, config.reward_fn) == (
        "sft", "prompts.jsonl", "fusedrl.engine.demos.vision_task:count_reward")
    assert (config.rollout.samples_per_prompt, config.train.iterations, config.ppo.estimator) == (
        8, cfg.rl_iterations, "grpo")


def test_the_fresh_task_counts_only_red_squares(tmp_path: Path):
    data = write_vision_data(12, 4, 0.0, 0, tmp_path, counted=bench_vlm_grpo.COUNTED,
                             question=bench_vlm_grpo.QUESTION)
    prompts = [json.loads(line) for line in open(data["prompts"])]
    assert all(p["prompt"][0]["content"][1]["text"] == bench_vlm_grpo.QUESTION for p in prompts)
    held_out = data["held_out"]
    assert all(t["answer"] == list(t["cells"]).count("red") for t in held_out)
    assert any(t["answer"] != len(t["cells"]) - list(t["cells"]).count(None) for t in held_out)
