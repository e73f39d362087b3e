"""train.gradient_checkpointing=auto (engine/plan/planner.py): the plan turns layer recompute on
where the run does not fit without it (or its auto KV pool would hold less than one group), and a
run's start resolves it by the same plan (plan/check.py:startup_check); off on the CPU."""
import dataclasses

import pytest
import torch

from fusedrl.engine.config.train import RunConfig
from fusedrl.engine.plan.check import startup_check
from fusedrl.engine.plan.planner import auto_checkpointing
from fusedrl.engine.plan.report import format_plan

from test_plan_qwen import CKPT, config, plan, qwen  # noqa: F401 (the fixture)

LONG = "rollout.max_new_tokens=16384"


def test_the_defaults_fit_a_16k_answer_by_turning_recompute_on(qwen):
    """Qwen2.5-7B GRPO on 8 x 80 GB with 16k-token answers and nothing else set: without recompute
    the update's activations leave no room; auto turns it on and the pool holds >= 8 answers."""
    result = plan("grpo", qwen["7B"], LONG)
    assert result.fits and result.kv_pool.sequences >= 8
    assert result.notes[0].startswith("train.gradient_checkpointing=auto: on (without it: peak ")
    assert result.phases == plan("grpo", qwen["7B"], LONG, CKPT).phases
    off = plan("grpo", qwen["7B"], LONG, "train.gradient_checkpointing=false")
    assert not off.fits or off.kv_pool.sequences < off.kv_pool.group
    assert "train.gradient_checkpointing=auto: on" in format_plan(result, "plan")


def test_short_answers_keep_recompute_off(qwen):
    result = plan("grpo", qwen["7B"])
    assert result.fits
    assert result.notes[0] == "train.gradient_checkpointing=auto: off (the run fits without it)"
    assert result.phases == plan("grpo", qwen["7B"], "train.gradient_checkpointing=false").phases


def test_explicit_values_are_kept(qwen):
    for value in ("true", "false"):
        result = plan("grpo", qwen["7B"], LONG, f"train.gradient_checkpointing={value}")
        assert not any("gradient_checkpointing=auto" in note for note in result.notes)


def test_the_start_resolves_auto_off_on_the_cpu_and_on_with_activation_offload(qwen):
    cpu = torch.device("cpu")
    cfg = config("grpo", qwen["7B"], LONG)
    assert cfg.train.gradient_checkpointing == "auto"
    assert startup_check(cfg, cpu, 1).train.gradient_checkpointing is False
    offload = config("grpo", qwen["7B"], "train.activation_offload=true")
    assert startup_check(offload, cpu, 1).train.gradient_checkpointing is True
    explicit = config("grpo", qwen["7B"], CKPT)
    assert auto_checkpointing(explicit, cpu, 1, 1) is True
    # A model built outside a run (auto unresolved) recomputes only with activation offload.
    assert cfg.train.checkpointing() is False and offload.train.checkpointing() is True


def test_option_values(qwen):
    assert RunConfig().gradient_checkpointing == "auto"
    for value, want in (("true", True), ("false", False), ("auto", "auto")):
        cfg = config("grpo", qwen["7B"], f"train.gradient_checkpointing={value}")
        assert cfg.train.gradient_checkpointing == want
    with pytest.raises(ValueError, match="train.gradient_checkpointing must be true, false or auto"
                                         ", got 'sometimes'"):
        RunConfig(gradient_checkpointing="sometimes")
    with pytest.raises(ValueError, match="train.activation_offload=true moves what"):
        RunConfig(gradient_checkpointing=False, activation_offload=True)
    assert dataclasses.replace(RunConfig(), activation_offload=True).checkpointing() is True
