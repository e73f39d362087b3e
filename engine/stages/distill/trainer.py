"""The on-policy distillation stage: `train_distill(DistillConfig(...))` trains the student (the
config's `policy`) to match a frozen teacher of the same vocabulary on the student's own samples.

An iteration: the student samples (the RL stages' one rollout interface, rollout/sampler.py: from
its one weight copy in the hybrid actor; single-turn answers or multi-turn trajectories, whose
environment tokens are no targets; whole groups or partial rollouts), or with GKD's distill.lmbda <
1 takes the dataset's completions instead (completions.py); the teacher reads the batch in one
frozen forward in this process, laid out as the reference model is (teacher.py); the student then
takes ppo.epochs of minibatch steps on the divergence at every target token (update.py), plus
distill.reward_coef x the reward's group advantage when asked. No reference model is loaded: the
teacher is the anchor.

RUN_DIR/ as for GRPO: config.yaml, metrics.jsonl, checkpoints/step-0000000N/ (the student, or with
lora its adapters, the optimizer, schedule, RNG and loop state: resumable and bit-exact as every
stage), final/ (the student; with lora the adapters merged, and final_adapter/).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ...config.compatibility import refuse_for_vision, refuse_incompatible
from ...config.distill import DistillConfig
from ...data.prompts import PromptRow, load_prompts
from ...errors import ConfigValueError, NonFiniteError
from ...parallel import distributed
from ...plan.check import startup_check
from ...runs.run_dir import releases_output_dir
from ...sandbox.isolation import open_sandbox
from ...train import adapters, optim, runlog
from ...train.loop import RunPlan, run_training
from ...train.run_setup import start_run
from ..rollout.group_advantages import group_token_advantages
from ..rollout.agent_rows import build_agents
from ..rollout.sampled_rows import Scoring
from ..rollout.models import PPOModels
from ..rollout.phase_timer import PhaseTimer
from ..rollout.prompt_stream import next_prompts
from ..rollout.sampler import Sampler, build_sampler
from ..rollout.scored_rows import Samples
from ..rollout.state import PPOState
from ..rollout.build import build_models, build_optimizers, open_rewards, trainables
from ..rollout.optimizers import Optimizers
from ..rewards.combined import RewardFunctions
from .completions import check_completions, completion_rows, on_policy
from .teacher import (Teacher, load_teacher, refuse_other_images, refuse_other_vocabulary,
                      score_with_teacher)
from .update import DistillBatch, DistillSettings, distill_update


@releases_output_dir
def train_distill(cfg: DistillConfig, reward_fn=None,
                  evaluate: Optional[Callable[[PPOModels], dict]] = None, dataset=None,
                  callbacks=()) -> Path:
    """Train the student per `cfg`; returns its exported directory (RUN_DIR/final).

    reward_fn: with distill.reward_coef > 0, a reward function or a list of them instead of
    cfg.reward_fn (as train_ppo takes them). evaluate: called with the models after every logged
    iteration, its metrics logged as "eval". dataset: a datasets.Dataset of prompts instead of
    cfg.prompts_file. callbacks: the program's (engine/train/callbacks.py)."""
    rewarded = cfg.distill.reward_coef > 0
    functions = ([] if not rewarded else cfg.reward_fns() if reward_fn is None
                 else list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn])
    with open_sandbox(cfg.sandbox.allow_weak_isolation, [*functions, *(cfg.rollout.tools or [])],
                      cfg.reward.fn_timeout_s, cfg.rollout.multi_turn) as sandbox_mode:
        rewards = open_rewards(cfg, reward_fn) if rewarded else None
        try:
            return _train(cfg, rewards, evaluate, dataset, sandbox_mode, callbacks)
        finally:
            if rewards is not None:
                rewards.close()


def _train(cfg: DistillConfig, rewards: Optional[RewardFunctions], evaluate, dataset,
           sandbox_mode: str, callbacks) -> Path:
    run = start_run(cfg.seed, cfg.train, cfg.output_dir, *cfg.paths(), kind="distill",
                    config=cfg, check=startup_checks)
    cfg = run.config
    refuse_incompatible(cfg, moe=run.configs["policy"].moe is not None)
    if run.processor is not None:
        refuse_for_vision(cfg)
        if cfg.distill.lmbda < 1:
            raise ConfigValueError(
                f"distill.lmbda={cfg.distill.lmbda} with a vision-language model: not supported "
                "(the dataset's completions are read as text prompts, without their images); "
                "set distill.lmbda=1")
    device, tokenizer = run.device, run.tokenizer
    agents = build_agents(cfg.rollout, tokenizer)
    prompts, truncated = load_prompts(
        cfg.prompts_file if dataset is None else dataset, run.data_reader,
        cfg.rollout.max_prompt_length,
        run.configs["policy"].max_model_len, cfg.rollout.truncate_prompts, cfg.data.prompt_column,
        cfg.data.chat_template)
    if cfg.distill.lmbda < 1:
        check_completions(prompts)
    models = build_models(cfg, device, run.dtype, tokenizer, rewards, run.dims,
                          with_reference=False)
    teacher = load_teacher(cfg.teacher, run.dtype, device, run.dims)
    opts, schedules = build_optimizers(models, cfg)
    plan = RunPlan(cfg.output_dir, cfg, cfg.train, cfg.train.iterations,
                   eval_every=cfg.train.log_every, callbacks=callbacks)
    sampler = build_sampler(cfg, models, prompts, agents)
    try:
        run_training(plan, trainables(cfg, models, opts, schedules, device, run.dtype, run.dims),
                     PPOState(), iteration_step(cfg, models, teacher, opts, schedules, prompts,
                                                sampler, tokenizer, device),
                     evaluate=None if evaluate is None else lambda: evaluate(models),
                     info={"prompts": len(prompts), "truncated_prompts": truncated,
                           "kv_pool_bytes": models.actor.kv_pool_bytes, "sandbox": sandbox_mode},
                     device=device)
    finally:
        sampler.close()  # environments of trajectories still in flight (partial rollouts)
    final = Path(cfg.output_dir) / "final"
    adapters.export(models.policy, models.lora, final, cfg.policy)  # collective
    return final


def startup_checks(cfg: DistillConfig, device: torch.device, gpus: int) -> DistillConfig:
    """The stage's start-up check (start_run's `check`: before the output directory is claimed or
    a model loads): a teacher of another vocabulary (or distill.top_k past it), or one that reads
    images otherwise than the student, refused in one line, then every stage's
    (plan/check.py)."""
    refuse_other_vocabulary(cfg.policy, cfg.teacher,
                            cfg.distill.top_k if cfg.distill.mode == "top_k" else None)
    refuse_other_images(cfg.policy, cfg.teacher)
    return startup_check(cfg, device, gpus)


def iteration_step(cfg: DistillConfig, models: PPOModels, teacher: Teacher, opts: Optimizers,
                   schedules: list, prompts: list[PromptRow], sampler: Sampler, tokenizer,
                   device) -> Callable[[PPOState], dict]:
    """One distillation iteration as the training loop's step: the batch (the student's samples,
    `sampler`'s, or the dataset's completions), the teacher's forward, the update, the schedules
    moved on (an iteration whose partial rollouts complete no group trains nothing)."""
    score = Scoring.of(cfg, models)
    settings = DistillSettings.of(cfg)
    r = cfg.rollout

    def step(state: PPOState) -> dict:
        it = state.step
        timer = PhaseTimer(device)
        fresh = on_policy(cfg, it)
        if fresh:
            samples, metrics = sampler.sample(state, cfg.seed * 1_000_003 + it, timer)
            if samples is None:  # partial rollouts: every group still has answers in flight
                for s in schedules:
                    optim.advance_schedule(s)
                return {**metrics, **timer.metrics()}
        else:
            rows = next_prompts(prompts, r.prompts_per_iteration, cfg.seed, state, models.ranks)
            samples = score(completion_rows(rows, tokenizer, r.max_prompt_length,
                                            r.max_new_tokens), timer)
            metrics = {}
        with timer.phase("teacher"):
            teacher_scores = score_with_teacher(
                teacher, samples.packed, cfg.distill.temperature, r.forward_tokens,
                cfg.distill.top_k if cfg.distill.mode == "top_k" else None, models.ranks)
        batch = DistillBatch(samples.packed, teacher_scores,
                             samples.sampler_logprobs.view(-1).index_select(
                                 0, samples.packed.grid_index),
                             reward_advantages(cfg, models, samples) if fresh else None)
        with timer.phase("train"):
            update = distill_update(models, teacher, opts, batch, settings, cfg.seed + it)
        metrics.update(update, on_policy=fresh, lr=schedules[0].get_last_lr()[0],
                       **batch_metrics(samples, models, cfg.distill.reward_coef > 0),
                       **(models.score.metrics() if models.score is not None else {}))
        for s in schedules:
            optim.advance_schedule(s)
        return {**metrics, **timer.metrics()}
    return step


def reward_advantages(cfg: DistillConfig, models: PPOModels,
                      samples: Samples) -> Optional[torch.Tensor]:
    """The reward's group advantage of each target [M] (ppo.estimator over each prompt's
    rollout.samples_per_prompt rows; critic=none makes it a group estimator), or None without
    distill.reward_coef. A non-finite score fails the run (its group's advantage is undefined)."""
    if cfg.distill.reward_coef == 0:
        return None
    if not bool(torch.isfinite(samples.scores).all()):
        raise NonFiniteError("distill.reward_coef: the reward gave a NaN or infinite score")
    mask = samples.packed.grid_mask()
    grid = group_token_advantages(samples.scores, mask, samples.n, cfg.ppo.estimator,
                                  sum_over=distributed.data_parallel_sum(models.ranks))
    return grid.view(-1).index_select(0, samples.packed.grid_index)


def batch_metrics(samples: Samples, models: PPOModels, rewarded: bool) -> dict:
    """The batch's size over the data ranks: tokens (targets), rows; and score_mean when a reward
    scores the rows (distill.reward_coef > 0: without one there is no score to report)."""
    packed = samples.packed
    sums = distributed.all_reduce_sum({"tokens": packed.num_targets, "rows": len(packed.seqlens)},
                                      models.ranks)
    if not rewarded:
        return sums
    score = distributed.all_reduce_tensor(samples.scores.double().sum(), ranks=models.ranks)
    return {**sums, "score_mean": runlog.host_values({"s": score})["s"] / max(sums["rows"], 1)}
