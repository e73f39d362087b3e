"""`fusedrl demo` end to end on a very short setting, and the task's own checker."""
import json
import random

import pytest

from fusedrl.engine import cli
from fusedrl.engine.config.demo import DemoConfig
from fusedrl.engine.demos.sorting_task import corrupt, is_correct, prompt_text


def test_checker_and_corruptions():
    assert is_correct("sort 4 1 3 1 :", "1 1 3 4")
    assert not is_correct("sort 4 1 3 1 :", "1 3 4")
    rng = random.Random(0)
    for _ in range(200):
        digits = [rng.randrange(10) for _ in range(4)]
        bad = corrupt(digits, rng)
        assert not is_correct(prompt_text(digits), " ".join(map(str, bad)))


def test_a_miscount_stays_in_order():
    # Only counting the digits catches it (the mistake PPO made against order-only pairs).
    rng = random.Random(1)
    for _ in range(200):
        digits = [rng.randrange(10) for _ in range(4)]
        bad = corrupt(digits, rng, "miscount")
        assert bad == sorted(bad) and len(bad) == 4 and bad != sorted(digits)


def test_demo_end_to_end(tmp_path, capsys, cpu_user_backend):
    out = tmp_path / "demo"
    # 8 prompts x 4 samples: one PPO minibatch of 32 rows.
    cli.main(["demo", f"output_dir={out}", "train_prompts=32", "eval_prompts=6", "sft_epochs=1",
              "rm_epochs=1", "rl_iterations=1", "rl_prompts=8", "eval_samples=2", "--quiet"])
    printed = capsys.readouterr().out
    assert "PPO accuracy (held-out, sampled)" in printed
    results = json.loads((out / "results.json").read_text())
    for key in ("sft_accuracy", "rm_heldout_accuracy", "rl_accuracy", "rl_mean_score", "rl_kl"):
        assert results[key] is not None
    stages = results["stage_seconds"]
    assert list(stages) == ["setup", "sft", "evaluations", "rm", "rl"]
    assert 0 < sum(stages.values()) <= results["seconds"] and min(stages.values()) > 0
    assert "time by stage" in printed and "PPO " in printed.split("time by stage")[1]
    assert (out / "rl" / "final" / "model.safetensors").exists()
    assert (out / "rl" / "plots" / "train.png").exists()
    capsys.readouterr()
    assert cli.main(["demo", f"output_dir={out}", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"fusedrl demo: output_dir={out} exists and is not empty; pass "
                                       "overwrite=true or another output_dir\n")


def test_grpo_demo_end_to_end(tmp_path, capsys, cpu_user_backend):
    out = tmp_path / "grpo"
    cli.main(["demo", "algo=grpo", f"output_dir={out}", "train_prompts=64", "eval_prompts=6", "sft_epochs=1",
              "rl_iterations=1", "rl_prompts=4", "eval_samples=2", "--quiet"])
    printed = capsys.readouterr().out
    assert "GRPO accuracy (held-out, sampled)" in printed and "GRPO mean program reward" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["algo"] == "grpo" and results["rm_heldout_accuracy"] is None
    assert not (out / "rm").exists() and (out / "rl" / "final" / "model.safetensors").exists()


def test_demo_config_errors():
    with pytest.raises(ValueError, match="demo_noise must be in"):
        DemoConfig(demo_noise=1.0)
    with pytest.raises(ValueError, match="algo must be one of"):
        DemoConfig(algo="dpo")


def test_moe_demo_base_model_and_its_adapters(tmp_path):
    from fusedrl.engine.model.hf_io import load_model
    from fusedrl.engine.model.moe import moe_blocks
    from fusedrl.engine.demos.sorting import rl_training
    from fusedrl.engine.demos.sorting_task import build_base_model

    model = load_model(build_base_model(tmp_path, 0, "qwen3_moe"))
    assert [b.moe.num_experts * 10 + b.moe.top_k for b in moe_blocks(model)] == [82, 82, 82]
    assert rl_training(DemoConfig(arch="qwen3_moe", lora_rank=4))["lora"].targets == ("q_proj", "k_proj", "v_proj",
                                                                                        "o_proj")


def test_a_stopped_demo_says_how_to_rerun_the_demo(tmp_path, capsys, cpu_user_backend, monkeypatch):
    """Ctrl-C in one of the demo's stages: its advice is the demo's (its stages run with
    train.resume=false, which `fusedrl demo` has no option for), and the advice works."""
    import os
    import signal

    from fusedrl.engine.train import loop

    step = loop.run_step

    def ctrl_c_at_the_first_step(*args, **kwargs):
        monkeypatch.setattr(loop, "run_step", step)
        os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "run_step", ctrl_c_at_the_first_step)
    out = tmp_path / "grpo"
    args = ["demo", "algo=grpo", f"output_dir={out}", "train_prompts=64", "eval_prompts=6",
            "sft_epochs=1", "rl_iterations=1", "rl_prompts=4", "eval_samples=2", "--quiet"]
    assert cli.main(args) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("fusedrl demo: stopped by SIGINT at step 1 of ")
    assert err[-1].endswith("saved; a demo does not resume: rerun it with overwrite=true to start "
                            "it again")
    assert "train.resume" not in err[-1]
    assert cli.main([*args, "overwrite=true"]) == 0
    assert (out / "rl" / "final" / "model.safetensors").exists()
