"""The models, reward functions, optimizers and checkpoint parts every RL stage (PPO, GRPO,
distillation) builds the same way: `build_models` (the policy shared with the actor, the frozen
reference, the critic, the scorer), `open_rewards`, `build_optimizers` and `trainables` (what a
checkpoint holds)."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable, Optional

import torch
from torch import nn

from ...config.ppo import GRPOConfig, PPOConfig
from ...errors import ModelError, UsageError
from ...inference.hybrid_actor import HybridActor
from ...model.hf_io import load_model
from ...model.reward_model import load_reward_model
from ...model.value_model import LoRACritic, load_value_model, shared_value_head
from ...parallel import distributed
from ...parallel.dims import ParallelDims
from ...parallel.layout import layout, layout_at_load
from ...plan.planner import rollout_kv_bytes
from ...train import adapters, optim
from ...train.vision_tower import set_vision_trainable
from ...train.checkpoint import SavedModel, Trainables
from ..rewards.combined import RewardFunctions, open_reward_functions
from .models import PPOModels
from .optimizers import Optimizers
from .reward_scores import FunctionScorer, reward_model_scorer


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
        # The stages share this: name the one the user ran (`fusedrl grpo` is no PPO to them).
        stage = ("GRPO" if isinstance(cfg, GRPOConfig) else "PPO" if isinstance(cfg, PPOConfig)
                 else "distillation with distill.reward_coef > 0")
        raise UsageError(
            f"{stage} needs a reward: set reward_model, reward_fn or rollout.environment (or "
            "pass reward_fn=...)")
    reward = cfg.reward
    return open_reward_functions(functions, reward.weights, reward.isolation,
                                 reward.fn_timeout_s)


@contextlib.contextmanager
def named(option: str, path):
    """A model that will not load names the option that gave it: which of the run's models is not
    what it should be (an SFT model given as reward_model lacks the score head)."""
    try:
        yield
    except ModelError as e:
        raise ModelError(f"{option}={path}: {e}") from None


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
    with named("policy", cfg.policy):
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
        with named("reward_model", cfg.reward_model):
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
                        overlap_decode=cfg.rollout.overlap_decode,
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
        critic.requires_grad_(True)
        set_vision_trainable(critic, cfg.train.train_vision)  # as the policy's tower
        return critic.train()
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
