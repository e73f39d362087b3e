"""The PPO stage: `train_ppo(PPOConfig(...))` trains the policy against a reward model or function.

RUN_DIR/ as for SFT/RM (config.yaml, metrics.jsonl, tensorboard/), plus
    checkpoints/step-0000000N/   the one checkpoint layout (engine/train/checkpoint/): the policy
                                 (with lora its adapters instead, `policy_adapter`), the critic
                                 (with critic_lora its adapters and value head, `critic_adapter`)
                                 or the shared value head, the optimizers, schedules, RNG and the
                                 loop state (iteration, KL coefficient, reward moments, ptx
                                 position)
    final/                       the trained policy, a transformers-loadable directory (with lora:
                                 the adapters merged; final_adapter/ holds them for PEFT)
    final_critic/                the separate critic, when there is one (with critic_lora: merged;
                                 final_critic_adapter/ holds its adapters and value head)
Under torchrun every model is sharded (train.data_parallel) except the adapted ones: the policy and
the shared value head with lora, the LoRA critic and its trunk with critic_lora are whole on every
rank, their adapters' gradients averaged over the ranks. Each rank samples its own
rollout.prompts_per_iteration prompts (an iteration's global batch: x the number of ranks); with
train.tensor_parallel=T every model is laid out for T tensor ranks instead (parallel/layout.py) and
a tensor group samples, scores and trains the same rows in lockstep, one data rank of world_size / T
(TensorParallel.data_ranks, PPOModels.ranks); with train.context_parallel=C a context group likewise
(each of its ranks generates the group's rows and takes its first rank's; every scoring and training
forward then runs on each rank's shard of the pack: parallel/context_parallel.py); see
experience.py and update.py; what carries from one iteration to the next, state.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ...config.compatibility import (refuse_for_vision, refuse_incompatible,
                                      refuse_text_reward_model)
from ...config.ppo import GRPOConfig, PPOConfig
from ...config.train import DataConfig
from ...data.loading import load_examples
from ...data.prompts import load_prompts
from ...model.causal_lm import CausalLM
from ...model.peft_io import save_adapter
from ...model.value_model import LoRACritic, save_value_model
from ...train import adapters, optim
from ...train.loop import RunPlan, StopTraining, run_training
from ...runs.run_dir import releases_output_dir
from ...sandbox.isolation import open_sandbox
from ...plan.check import startup_check
from ...train.run_setup import start_run
from ..rewards.combined import RewardFunctions
from ..rollout.agent_rows import build_agents
from .experience import ExperienceSettings, make_rollout
from ..rollout.models import PPOModels
from ..rollout.phase_timer import PhaseTimer
from .ptx import PtxLoss
from ..rollout.sampler import Sampler, build_sampler
from ..rollout.state import PPOState
from .controllers import Controllers
from ..rollout.build import build_models, build_optimizers, open_rewards, trainables
from ..rollout.optimizers import Optimizers
from .update import UpdateSettings, minibatch_rule, ppo_update


class KLCeilingExceeded(StopTraining):
    """The policy drifted further from the reference than reward.kl_ceiling allows."""


def check_kl(kl: float, ceiling: float | None, iteration: int) -> None:
    """Stop the run when the KL per sequence passes reward.kl_ceiling, or is not a number at all
    (NaN > ceiling is False, so a NaN would otherwise slip past the guard)."""
    if not math.isfinite(kl):
        raise KLCeilingExceeded(
            f"iteration {iteration}: KL to the reference is {kl}: the policy or the "
            "reference gives non-finite log-probs; stopping")
    if ceiling is not None and kl > ceiling:
        raise KLCeilingExceeded(f"iteration {iteration}: KL to the reference {kl:.4g} exceeds "
                                f"reward.kl_ceiling={ceiling}; stopping (reward hacking guard)")


def ptx_loss(cfg: PPOConfig, tokenizer, policy: CausalLM, device) -> Optional[PtxLoss]:
    """The PPO-ptx term on cfg.ptx_file's demonstrations (None with ppo.ptx_coef 0)."""
    if cfg.ppo.ptx_coef == 0:
        return None
    data = DataConfig(train_file=cfg.ptx_file, eval_fraction=0.0)
    examples = load_examples(data, tokenizer, "sft", cfg.seed).train
    return PtxLoss(policy, examples, data.tokens_per_batch, cfg.seed, device)


@releases_output_dir
def train_ppo(cfg: PPOConfig, reward_fn=None,
              evaluate: Optional[Callable[[PPOModels], dict]] = None, dataset=None,
              callbacks=()) -> Path:
    """Train per `cfg`; returns the exported policy directory (RUN_DIR/final; with lora.rank > 0 the
    adapters merged into it, and themselves in RUN_DIR/final_adapter).

    reward_fn: a reward function, or a list of them (docs/rewards.md: TRL's keyword form or
    fn(prompt_texts, response_texts) -> floats), instead of cfg.reward_fn; weighted by
    reward.weights.
    evaluate: called with the models after every logged iteration; its metrics are logged as "eval".
    dataset: a datasets.Dataset of prompts, instead of cfg.prompts_file.
    callbacks: the program's (engine/train/callbacks.py), told of every iteration.
    """
    uses = [*cfg.reward_fns(), *(cfg.rollout.tools or [])] if reward_fn is None else [
        *(reward_fn if isinstance(reward_fn, (list, tuple)) else [reward_fn]),
        *(cfg.rollout.tools or [])]
    with open_sandbox(cfg.sandbox.allow_weak_isolation, uses,  # before workers start
                      cfg.reward.fn_timeout_s, cfg.rollout.multi_turn) as sandbox_mode:
        rewards = open_rewards(cfg, reward_fn)
        try:
            return _train(cfg, rewards, evaluate, dataset, sandbox_mode, callbacks)
        finally:
            if rewards is not None:  # their workers end with the run, however it ends
                rewards.close()


def _train(cfg: PPOConfig, rewards: Optional[RewardFunctions],
           evaluate: Optional[Callable[[PPOModels], dict]], dataset=None,
           sandbox_mode: str = "", callbacks=()) -> Path:
    """train_ppo's run, scored by the open `rewards` (None: by cfg.reward_model)."""
    run = start_run(cfg.seed, cfg.train, cfg.output_dir, *cfg.paths(),
                    kind="grpo" if isinstance(cfg, GRPOConfig) else "ppo", config=cfg,
                    check=startup_check)
    cfg = run.config  # train.gradient_checkpointing=auto resolved
    device, tokenizer = run.device, run.tokenizer
    # the pairs of options a mixture-of-experts policy does not run with, from its config.json
    refuse_incompatible(cfg, moe=run.configs["policy"].moe is not None)
    if run.processor is not None:
        refuse_for_vision(cfg)
        refuse_text_reward_model(cfg.reward_model, run.configs.get("reward_model"))
    agents = build_agents(cfg.rollout, tokenizer)  # tools, environment, template: before any model
    prompts, truncated = load_prompts(
        cfg.prompts_file if dataset is None else dataset, run.data_reader,
        cfg.rollout.max_prompt_length,
        run.configs["policy"].max_model_len, cfg.rollout.truncate_prompts, cfg.data.prompt_column,
        cfg.data.chat_template)
    models = build_models(cfg, device, run.dtype, tokenizer, rewards, run.dims)
    opts, schedules = build_optimizers(models, cfg)
    state = PPOState(kl_coef=cfg.reward.kl_coef)
    rows = cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt
    rule = minibatch_rule(rows, cfg.ppo.minibatch_size)
    plan = RunPlan(cfg.output_dir, cfg, cfg.train, cfg.train.iterations,
                   eval_every=cfg.train.log_every, notices=[rule] if rule else [],
                   callbacks=callbacks)
    sampler = build_sampler(cfg, models, prompts, agents)
    try:
        run_training(plan, trainables(cfg, models, opts, schedules, device, run.dtype, run.dims),
                     state, iteration_step(cfg, models, opts, schedules, sampler,
                                           ptx_loss(cfg, tokenizer, models.policy, device), device),
                     evaluate=None if evaluate is None else lambda: evaluate(models),
                     info={"prompts": len(prompts), "truncated_prompts": truncated,
                           "kv_pool_bytes": models.actor.kv_pool_bytes, "sandbox": sandbox_mode},
                     device=device)
    finally:
        sampler.close()  # environments of trajectories still in flight
    final = Path(cfg.output_dir) / "final"
    adapters.export(models.policy, models.lora, final, cfg.policy)  # collective: streamed to rank 0
    if models.critic is not None:
        export_critic(cfg, models.critic)
    return final


def export_critic(cfg: PPOConfig, critic: nn.Module) -> None:
    """RUN_DIR/final_critic, a ValueModel directory; a LoRACritic also writes its adapters and value
    head to final_critic_adapter/ (PEFT SEQ_CLS on its start: the reward model, else the policy)
    and is merged into its trunk for final_critic/ (the run is over)."""
    final = Path(cfg.output_dir) / "final_critic"
    if isinstance(critic, LoRACritic):
        # collective
        save_adapter(critic.lora, adapters.adapter_dir(final), cfg.reward_model or cfg.policy)
        critic = critic.merged()
    save_value_model(critic, final)


def iteration_step(cfg: PPOConfig, models: PPOModels, opts: Optimizers, schedules: list,
                   sampler: Sampler, ptx: Optional[PtxLoss],
                   device) -> Callable[[PPOState], dict]:
    """One PPO iteration as the training loop's step: sample and score (the run's one rollout
    interface, sampler.py), build the rollout, update, then move the KL controller and the
    schedules on.
    What carries to the next iteration lives in the loop state (state.py); the returned metrics
    only report."""
    experience_settings, update_settings = ExperienceSettings.of(cfg), UpdateSettings.of(cfg)

    def step(state: PPOState) -> dict:
        it = state.step
        controllers = Controllers.restore(state, cfg.reward)
        timer = PhaseTimer(device)
        samples, sampling_metrics = sampler.sample(state, cfg.seed * 1_000_003 + it, timer)
        if samples is None:  # every group still has answers in flight: nothing to learn yet
            for s in schedules:
                optim.advance_schedule(s)
            return {**sampling_metrics, **timer.metrics()}
        experience = make_rollout(models, samples, experience_settings, controllers.kl.value,
                                  controllers.moments, timer)
        scores = models.score.metrics() if models.score is not None else {}
        metrics = {**experience.metrics, **sampling_metrics, **scores,
                   "lr": schedules[0].get_last_lr()[0]}
        rollout = experience.rollout
        if rollout is None:
            metrics.update(skipped=True, skip_reason=experience.skip_reason)
        else:
            check_kl(experience.kl, cfg.reward.kl_ceiling, it)
            with timer.phase("train"):
                update = ppo_update(models, opts, rollout, update_settings, cfg.seed + it,
                                    None if ptx is None else lambda: ptx(state.ptx))
            metrics.update(update.metrics())
            metrics["tokens_per_s_train"] = cfg.ppo.epochs * metrics["tokens"] / max(
                timer.seconds["train"], 1e-9)
            if update.updates == 0:
                metrics.update(skipped=True,
                               skip_reason="every minibatch had a non-finite loss or gradient")
            controllers.kl.update(experience.kl, rollout.mask.shape[0] * models.ranks.size())
            controllers.save(state)
        # after the update; a skipped iteration keeps its place in the schedule too
        for s in schedules:
            optim.advance_schedule(s)
        return {**metrics, **timer.metrics()}
    return step
