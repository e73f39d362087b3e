"""`fusedrl demo task=distill`: on-policy distillation on the sorting task (engine/demos/
sorting_task.py), beside GRPO of the same budget from the same start.
  1. the teacher: the task's tiny Llama, SFT on correct demonstrations;
  2. the student: a smaller Llama (half the width, two layers), SFT for one epoch on the noisy
     demonstrations (cfg.demo_noise of them wrong): it knows the format and sorts badly;
  3. distillation: the student samples, the teacher scores every sampled token in the same
     process, the student follows the reverse KL to it (`fusedrl distill`'s defaults);
  4. GRPO from the same student, with the program's check as the reward, over as many
     iterations of as many samples.
Accuracy is the program's judgement of answers sampled at the rollout temperature, on held-out
prompts.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..config.demo import DemoConfig
from ..runs.run_dir import claim, releases_output_dir
from .run_plots import RunPlots
from .sorting import (RL_LR, TEMPERATURE, aligned, last_metric, program_reward,
                      sampled_accuracy, starts_over, written)
from .sorting_task import build_base_model, build_tokenizer, write_data

# The student: the base's 96 wide, 3 layers, halved in width and cut to two layers (a quarter of
# its weights per layer).
STUDENT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2)
SAMPLES_PER_PROMPT = 4
# Rows per optimizer step, both runs: 8 steps per iteration of 16 prompts x 4 samples.
MINIBATCH = 8
# Distillation's step, constant: its per-token signal is dense and low in variance and takes the
# SFT's rate. At 1e-3 decaying, one step an iteration, the divergence stayed at 2.5 over 30
# iterations (seed 0); at 3e-3 constant with 4 steps an iteration seed 1's student went from 1.8%
# to 8.5% in 30, with 8 steps an iteration to 16% in 30 and 30% in 45; 5e-3 did worse (9%).
# GRPO keeps the sorting demo's rate (RL_LR).
DISTILL_LR = 3e-3


def rollout(cfg: DemoConfig):
    """Both runs' sampling: cfg.rl_prompts prompts x SAMPLES_PER_PROMPT answers an iteration."""
    from ..config.rollout import RolloutConfig

    return RolloutConfig(prompts_per_iteration=cfg.rl_prompts,
                         samples_per_prompt=SAMPLES_PER_PROMPT, max_new_tokens=12,
                         temperature=TEMPERATURE, kv_cache_memory=1 << 24)


def run_distill_stage(cfg: DemoConfig, out: Path, prompts: str, student: Path, teacher: Path,
                      loop: dict) -> Path:
    """On-policy distillation of `student` from `teacher`; returns the student's directory."""
    from ..config.distill import DistillConfig
    from ..config.ppo import LoopConfig, UpdateConfig
    from ..config.train import OptimConfig
    from ..stages.distill.trainer import train_distill

    return train_distill(DistillConfig(
        policy=str(student), teacher=str(teacher), prompts_file=prompts,
        output_dir=str(out / "distill"), seed=cfg.seed, rollout=rollout(cfg),
        ppo=UpdateConfig(estimator="grpo", kl_loss_coef=0.0, vf_coef=0.0, epochs=1,
                         minibatch_size=MINIBATCH),
        optim=OptimConfig(lr=DISTILL_LR, max_grad_norm=1.0, min_lr_ratio=1.0),
        train=LoopConfig(iterations=cfg.rl_iterations, log_every=10, **loop)))


def run_grpo_baseline(cfg: DemoConfig, out: Path, prompts: str, student: Path,
                      loop: dict) -> Path:
    """GRPO of `student` with the program's reward, the distillation's budget; returns its
    directory."""
    from ..config.ppo import GRPOConfig, LoopConfig, UpdateConfig
    from ..config.train import OptimConfig
    from ..stages.ppo.trainer import train_ppo

    return train_ppo(GRPOConfig(
        policy=str(student), prompts_file=prompts, output_dir=str(out / "grpo"), seed=cfg.seed,
        rollout=rollout(cfg),
        ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=MINIBATCH, vf_coef=0.0,
                         kl_loss_coef=0.001),
        optim=OptimConfig(lr=RL_LR, max_grad_norm=1.0, min_lr_ratio=1.0),
        train=LoopConfig(iterations=cfg.rl_iterations, log_every=10, **loop)),
        reward_fn=program_reward)


@starts_over
@releases_output_dir
def run_distill_demo(cfg: DemoConfig, quiet: bool = False) -> dict:
    """The teacher and the student by SFT, then distillation and GRPO from the same student;
    returns (and saves) the table. cfg.output_dir is held as run_demo holds it
    (engine/demos/sorting.py)."""
    from ..config.train import DataConfig, OptimConfig, SFTConfig, TrainConfig
    from ..model.hf_io import load_model
    from ..stages.sft import train_sft

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    claim(out, "demo", overwrite=cfg.overwrite)
    noisy = write_data(cfg, out / "data")
    clean = write_data(dataclasses.replace(cfg, demo_noise=0.0), out / "data-teacher")
    tokenizer = build_tokenizer()
    loop = dict(device="cpu" if not torch.cuda.is_available() else None, precision=cfg.precision,
                progress=not quiet, resume=False)

    def sft(name: str, base: str, demos: str, epochs: int) -> Path:
        return train_sft(SFTConfig(
            model=base, output_dir=str(out / name), seed=cfg.seed,
            data=DataConfig(train_file=demos, tokens_per_batch=256, max_length=16,
                            max_prompt_length=8, eval_fraction=0.05),
            optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0),
            train=TrainConfig(epochs=epochs, eval_every=0, **loop)))

    def accuracy(model_dir: Path) -> float:
        return sampled_accuracy(load_model(model_dir), tokenizer, noisy["held_out"],
                                cfg.eval_samples, TEMPERATURE, cfg.seed)

    with RunPlots() as plots:
        teacher = sft("teacher", build_base_model(out / "teacher-base", cfg.seed, cfg.arch),
                      clean["sft"], cfg.sft_epochs)
        student = sft("student", build_base_model(out / "student-base", cfg.seed + 1, cfg.arch,
                                                  **STUDENT), noisy["sft"], 1)
        distilled = run_distill_stage(cfg, out, noisy["prompts"], student, teacher, loop)
        plots.add(out / "distill")
        grpo = run_grpo_baseline(cfg, out, noisy["prompts"], student, loop)
        plots.add(out / "grpo")
        table = {
            "task": "distill",
            "teacher": accuracy(teacher),
            "student_before": accuracy(student),
            "student_after": accuracy(distilled),
            "grpo": accuracy(grpo),
            "iterations": cfg.rl_iterations,
            "samples_per_iteration": cfg.rl_prompts * SAMPLES_PER_PROMPT,
            "final_divergence": last_metric(str(out / "distill"), "train", "divergence"),
            "seconds": time.perf_counter() - start,
        }
        table["gain_points"] = 100 * (table["student_after"] - table["student_before"])
        return written(out, table, plots)


def format_distill_table(table: dict) -> str:
    budget = f"{table['iterations']} iterations x {table['samples_per_iteration']} samples"
    rows = [("teacher accuracy (held-out, sampled)", f"{100 * table['teacher']:.1f}%"),
            ("student accuracy before", f"{100 * table['student_before']:.1f}%"),
            ("student after distillation", f"{100 * table['student_after']:.1f}%"),
            ("student after GRPO, same budget", f"{100 * table['grpo']:.1f}%"),
            ("distillation gain", f"{table['gain_points']:+.1f} points"),
            ("budget (each)", budget),
            ("wall time", f"{table['seconds']:.0f} s")]
    return aligned(rows)
