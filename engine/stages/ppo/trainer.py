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

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ...config.compatibility import refuse_for_vision, refuse_incompatible
from ...config.ppo import GRPOConfig, PPOConfig
from ...config.train import DataConfig
from ...data.loading import load_examples
from ...train.vision_tower import set_vision_trainable
from ...data.prompts import load_prompts
from ...errors import UsageError
from ...inference.hybrid_actor import HybridActor
from ...model.hf_io import load_model
from ...model.reward_model import load_reward_model
from ...model.causal_lm import CausalLM
from ...model.peft_io import save_adapter
from ...plan.planner import rollout_kv_bytes
from ...model.value_model import LoRACritic, load_value_model, save_value_model, shared_value_head
from ...parallel import distributed
from ...train import adapters, optim
from ...train.checkpoint import SavedModel, Trainables
from ...train.loop import RunPlan, StopTraining, run_training
from ...runs.run_dir import releases_output_dir
from ...sandbox.isolation import open_sandbox
from ...parallel.dims import ParallelDims
from ...parallel.layout import layout, layout_at_load
from ...plan.check import startup_check
from ...train.run_setup import start_run
from ..rewards.combined import RewardFunctions, open_reward_functions
from .agent_rows import build_agents
from .experience import ExperienceSettings, make_rollout
from .models import PPOModels
from .phase_timer import PhaseTimer
from .ptx import PtxLoss
from .sampler import Sampler, build_sampler
from .reward_scores import FunctionScorer, reward_model_scorer
from .state import Controllers, PPOState
from .update import Optimizers, UpdateSettings, minibatch_rule, ppo_update


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


def open_rewards(cfg: PPOConfig, reward_fn=None) -> Optional[RewardFunctions]:
    """The run's reward functions, open (each loaded, in its worker with reward.isolation=process:
    a wrong reward_fn is refused before anything else happens): `reward_fn` (a callable or a list
    of them) when given, else cfg.reward_fn's specs; None with a reward model, or where a
    multi-turn environment's rewards are the only ones (rollout.environment)."""
    if cfg.reward_model is not None:
        return None
    functions = cfg.reward_fns() if reward_fn is None else (
        list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn])
    if not functions and cfg.rollout.environment:
        return None
    if not functions:
        raise UsageError(
            "PPO needs a reward: set reward_model, reward_fn or rollout.environment (or "
            "pass reward_fn=...)")
    reward = cfg.reward
    return open_reward_functions(functions, reward.weights, reward.isolation,
                                 reward.fn_timeout_s)


def build_models(cfg: PPOConfig, device, dtype: torch.dtype, tokenizer,
                 rewards: Optional[RewardFunctions],
                 dims: Optional[ParallelDims] = None, with_reference: bool = True) -> PPOModels:
    """Policy (trainable, shared with the actor), frozen reference, critic and scorer (the reward
    model, else the open `rewards`: open_rewards), with parameters in `dtype` (train.precision;
    the critic's value head stays fp32). With lora.rank > 0 the policy's weights are frozen under
    adapters and no reference model is loaded; with critic_lora.rank > 0 the critic is adapters
    on the reward model's frozen decoder (build_critic).
    Under torchrun each model is sharded on the meta device and each rank reads only its shards
    (hf_io.load_model); a LoRA-adapted base too, its adapters and heads whole on every rank (but
    tensor-parallel, where the adapters are sliced like their base's weights). Each model is laid
    out for its role over `dims` (default: from cfg.train; engine/parallel/layout.py).
    with_reference=False: no reference model either (a stage that takes no KL to it: distillation,
    whose frozen teacher is the anchor)."""
    lora_run = cfg.lora.enabled
    if dims is None:
        dims = ParallelDims.from_train(cfg.train, distributed.world_size(),
                                       torch.device(device).type)
    sharder, frozen = layout_at_load("adapted", dims), layout_at_load("frozen", dims)
    policy = load_model(cfg.policy, dtype=dtype, device=device,
                        shard=sharder if lora_run else layout_at_load("trained", dims))
    policy.set_recompute(cfg.train.checkpointing(), cfg.train.activation_offload)
    set_vision_trainable(policy, cfg.train.train_vision)
    lora = adapters.attach(policy, cfg.lora)
    reference = None if lora or not with_reference else load_model(
        cfg.policy, dtype=dtype, device=device, shard=frozen).eval().requires_grad_(False)
    rm = None
    if cfg.reward_model:
        rm_is_trunk = cfg.critic == "separate" and cfg.critic_lora.enabled
        rm = load_reward_model(cfg.reward_model, dtype=dtype, device=device,
                               shard=sharder if rm_is_trunk
                               else frozen).eval().requires_grad_(False)
    critic = value_head = None  # critic="none": a group estimator needs no values
    if cfg.critic == "separate":
        critic = build_critic(cfg, rm, device, dtype, sharder if cfg.critic_lora.enabled
                              else layout_at_load("critic", dims))
    elif cfg.critic == "shared":
        value_head = shared_value_head(policy)
        # Beside adapters a replicated head, its gradients averaged (optim.clip_and_step).
        if not lora:
            layout(value_head, "head", dims)
    # The groups of ranks holding the same rows (tensor, context), and the ranks holding different
    # ones.
    groups = tuple(g for g in (policy.tensor_parallel, policy.context_parallel) if g is not None)
    ranks = groups[-1].data_ranks() if groups else distributed.WORLD
    if rm is not None:
        score = reward_model_scorer(rm,
                                    critic.lora
                                    if isinstance(critic, LoRACritic) and critic.trunk is rm
                                    else None)
    else:
        score = None if rewards is None else FunctionScorer(rewards, tokenizer, groups, ranks)
    # rollout.kv_cache_memory by the memory plan's rules (auto: the largest pool that fits).
    kv_bytes = rollout_kv_bytes(cfg, torch.device(device), distributed.world_size(),
                                distributed.local_world_size())
    actor = HybridActor(policy, tokenizer, kv_cache_memory=kv_bytes, device=device,
                        release_kv_pool=cfg.rollout.release_kv_pool,
                        persistent_weights=cfg.rollout.persistent_weights,
                        block_size=cfg.rollout.block_size,
                        max_num_seqs=cfg.rollout.max_rows,
                        batch_invariant=cfg.rollout.exact,
                        speculative_tokens=cfg.rollout.speculative_tokens,
                        speculate_below=cfg.rollout.speculate_below,
                        prefill_chunk=cfg.rollout.prefill_chunk,
                        record_routing=cfg.rollout.routing_replay and policy.config.moe is not None)
    return PPOModels(policy, reference, actor, critic, value_head, score, lora, ranks)


def build_critic(cfg: PPOConfig, rm, device, dtype: torch.dtype, sharder: Callable) -> nn.Module:
    """The separate critic, trainable: a ValueModel read from the reward model's directory, its
    score head as the value head (else from the policy's, base weights, with a zero value head);
    with critic_lora.rank > 0 a LoRACritic on the reward model itself (no second decoder), or
    without a reward model on a frozen copy of the policy's base weights (said on stderr: that copy
    costs a decoder's memory). Each loaded sharded by `sharder` (hf_io.load_model)."""
    if not cfg.critic_lora.enabled:
        start = "reward_model" if rm is not None else "lm"
        critic = load_value_model(cfg.reward_model or cfg.policy, dtype=dtype, device=device,
                                  shard=sharder, start=start)
        critic.set_recompute(cfg.train.checkpointing(), cfg.train.activation_offload)
        return critic.requires_grad_(True).train()
    if rm is not None:
        trunk, head = rm, distributed.whole_value(rm.score.weight.detach())
    else:
        trunk = load_model(cfg.policy, dtype=dtype, device=device,
                           shard=sharder).requires_grad_(False)
        head = torch.zeros(1, trunk.config.hidden_size, dtype=torch.float32, device=device)
        if distributed.is_main():
            print(
                "fusedrl: critic_lora without a reward model: the critic starts from the policy "
                "and runs on a frozen copy of its weights (a second decoder in memory)",
                file=sys.stderr)
    trunk.set_recompute(cfg.train.checkpointing(), cfg.train.activation_offload)
    return LoRACritic(trunk, head, cfg.critic_lora).train()


def build_optimizers(models: PPOModels, cfg: PPOConfig) -> tuple[Optimizers, list]:
    """AdamW for the policy (with the shared value head) and for the separate critic; one
    schedule step per iteration."""
    policy = models.lora if models.lora is not None else models.policy
    trained = nn.ModuleList(
        [policy] + ([models.value_head] if models.value_head is not None else []))
    policy_opt = optim.build_optimizer(trained, cfg.optim)
    critic_opt = None
    if models.critic is not None:
        critic_opt = optim.build_optimizer(models.critic,
                                           dataclasses.replace(cfg.optim,
                                                               lr=cfg.critic_lr or cfg.optim.lr))
    opts = Optimizers(policy_opt, critic_opt, cfg.optim.max_grad_norm,
                      models.policy.tensor_parallel)
    schedules = [optim.build_scheduler(o, cfg.optim, cfg.train.iterations) for o in opts.all()]
    return opts, schedules


def trainables(cfg: PPOConfig, models: PPOModels, opts: Optimizers, schedules, device, dtype,
               dims: ParallelDims) -> Trainables:
    """What a PPO checkpoint holds: the policy, the separate critic (or the shared value head), the
    optimizers and their schedules; a saved model loads laid out over `dims` for its role."""
    sharder, critic_sharder = layout_at_load("trained", dims), layout_at_load("critic", dims)
    saved = (
        {"policy": SavedModel(models.policy, lambda d: load_model(d, dtype=dtype, device=device,
                                                                  shard=sharder))}
        if models.lora is None else {"policy_adapter": adapters.saved_adapter(models.lora)})
    small = {}
    if isinstance(models.critic, LoRACritic):
        saved["critic_adapter"] = adapters.saved_adapter(models.critic.lora)
    elif models.critic is not None:
        saved["critic"] = SavedModel(models.critic,
                                     lambda d: load_value_model(d, dtype=dtype, device=device,
                                                                shard=critic_sharder))
    if models.value_head is not None:
        small["value_head"] = models.value_head
    return Trainables(saved, opts.all(), schedules, small)


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
    sandbox_mode = open_sandbox(cfg.sandbox.allow_weak_isolation, uses,  # before workers start
                                cfg.reward.fn_timeout_s, cfg.rollout.multi_turn)
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
