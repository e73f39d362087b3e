"""`fusedrl demo task=distill` end to end on a very short setting: its table, results.json and runs."""
import json

import pytest

from fusedrl.engine import cli
from fusedrl.engine.config.demo import DemoConfig


def test_distill_demo_end_to_end(tmp_path, capsys, cpu_user_backend):
    out = tmp_path / "distill"
    assert cli.main(["demo", "task=distill", f"output_dir={out}", "train_prompts=32", "eval_prompts=6",
                     "sft_epochs=1", "rl_iterations=1", "rl_prompts=4", "eval_samples=2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "student after distillation" in printed and "student after GRPO, same budget" in printed
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher", "student_before", "student_after", "grpo"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["final_divergence"] is not None
    assert (out / "distill" / "final" / "model.safetensors").exists()
    assert (out / "grpo" / "final" / "model.safetensors").exists()
    student = json.loads((out / "student" / "final" / "config.json").read_text())
    teacher = json.loads((out / "teacher" / "final" / "config.json").read_text())
    assert student["hidden_size"] < teacher["hidden_size"]


def test_the_distill_demo_has_its_own_output_dir_and_defaults():
    cfg = DemoConfig(task="distill")
    assert (cfg.output_dir, cfg.rl_iterations, cfg.digits) == ("fusedrl-demo-distill", 45, 4)
    assert DemoConfig().output_dir == "fusedrl-demo"
    with pytest.raises(ValueError, match=r"^lora_rank=4 with task=distill: its student trains"):
        DemoConfig(task="distill", lora_rank=4)
