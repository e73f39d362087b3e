"""The PPO stage: `run_ppo(PPOConfig(...))` trains the policy against a reward model or function.

RUN_DIR/ as for SFT/RM (config.yaml, metrics.jsonl, tensorboard/), plus
    checkpoints/step-0000000N/   policy/ (HF dir), critic/ (HF dir with value_head.weight) or
                                 value_head.pt (shared critic), ppo_state.pt (optimizers, schedules,
                                 RNG, iteration, KL coefficient, reward moments, ptx position)
    final/                       the trained policy, a transformers-loadable directory
    final_critic/                the separate critic, when there is one
"""
from __future__ import annotations

import dataclasses
import importlib
import random
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ...train import optim
from ...inference.hybrid_actor import HybridActor
from ...data.packing import collate_sft, epoch_order
from ...model.hf_io import load_model, save_model
from ...model.value_model import (load_value_model, save_value_model, shared_value_head, value_model_from_lm,
                           value_model_from_reward_model)
from ...data.records import read_jsonl
from ...data.examples import load_examples
from ...config.ppo import PPOConfig
from .core import KLController, RunningMoments
from .update import (Optimizers, PhaseTimer, PPOModels, function_scorer, make_rollout, ppo_update,
                             reward_model_scorer)
from ...model.reward_model import load_reward_model
from ...train.runlog import RunLog
from ..sft import sft_loss
from ...train.run_setup import resolve_device
from ...data.tokenization import tokenize_prompt
from ...config.train import DataConfig
from ...train.checkpoint import (TrainState, latest_checkpoint, rng_state, save_atomically, set_rng_state)
from ...train.loop import autocast_for, micro_batches, to_device

STATE_FILE = "ppo_state.pt"


class KLCeilingExceeded(RuntimeError):
    """The policy drifted further from the reference than reward.kl_ceiling allows."""


def _parse_prompt(row: dict) -> str:
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('expected an object with a non-empty string "prompt"')
    return prompt


def load_prompts(path, tokenizer, max_prompt_length: int) -> list[list[int]]:
    """Token ids of every prompt in a JSONL file of {"prompt": ...} lines."""
    texts = read_jsonl(path, _parse_prompt).records
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return [tokenize_prompt(tokenizer, t, max_prompt_length) for t in texts]


def prompt_indices(n_prompts: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """The prompts of `iteration`: consecutive slices of one seeded permutation per epoch, so a
    resumed run continues with exactly the prompts it would have seen."""
    start, out = iteration * per_iteration, []
    while len(out) < per_iteration:
        epoch, offset = divmod(start + len(out), n_prompts)
        out += epoch_order(n_prompts, seed, epoch)[offset:offset + per_iteration - len(out)]
    return out


def load_reward_fn(spec: str) -> Callable:
    """'package.module:function' -> the function."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"reward_fn must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def build_models(cfg: PPOConfig, device, tokenizer, reward_fn: Optional[Callable]) -> PPOModels:
    """Policy (trainable, shared with the actor), frozen reference, critic and scorer."""
    policy = load_model(cfg.policy, dtype=cfg.train.dtype, device=device)
    policy.gradient_checkpointing = cfg.train.gradient_checkpointing
    reference = load_model(cfg.policy, dtype=cfg.train.dtype, device=device).eval().requires_grad_(False)
    rm = None
    if cfg.reward_model:
        rm = load_reward_model(cfg.reward_model, dtype=cfg.train.dtype, device=device).eval().requires_grad_(False)
        score = reward_model_scorer(rm)
    else:
        fn = reward_fn or (load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None)
        if fn is None:
            raise ValueError("PPO needs a reward: set reward_model or reward_fn (or pass reward_fn=...)")
        score = function_scorer(fn, tokenizer)
    critic = value_head = None
    if cfg.critic == "separate":
        critic = value_model_from_reward_model(rm) if rm is not None else value_model_from_lm(policy)
        critic.requires_grad_(True).train()
        critic.gradient_checkpointing = cfg.train.gradient_checkpointing
    else:
        value_head = shared_value_head(policy)
    actor = HybridActor(policy, tokenizer, kv_cache_memory=cfg.rollout.kv_cache_memory,
                        block_size=cfg.rollout.block_size,
                        max_num_seqs=cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt)
    return PPOModels(policy, reference, actor, critic, value_head, score,
                     autocast=lambda: autocast_for(device, cfg.train.bf16))


def build_optimizers(models: PPOModels, cfg: PPOConfig) -> tuple[Optimizers, list]:
    """AdamW for the policy (with the shared value head) and for the separate critic; one
    schedule step per iteration."""
    trained = nn.ModuleList([models.policy] + ([models.value_head] if models.value_head is not None else []))
    policy_opt = optim.build_optimizer(trained, cfg.optim)
    modules, critic_opt = [trained], None
    if models.critic is not None:
        critic_opt = optim.build_optimizer(models.critic, dataclasses.replace(cfg.optim, lr=cfg.critic_lr or cfg.optim.lr))
        modules.append(models.critic)
    opts = Optimizers(policy_opt, critic_opt, modules, cfg.optim.max_grad_norm)
    schedules = [optim.build_scheduler(o, cfg.optim, cfg.train.iterations) for o in opts.all()]
    return opts, schedules


@dataclasses.dataclass
class PPOState:
    iteration: int = 0
    kl_coef: float = 0.0
    moments: dict = dataclasses.field(default_factory=dict)
    ptx: dict = dataclasses.field(default_factory=lambda: dataclasses.asdict(TrainState()))


def save_ppo_checkpoint(cfg: PPOConfig, state: PPOState, models: PPOModels, opts: Optimizers, schedules) -> Path:
    def write(tmp: Path):
        save_model(models.policy, tmp / "policy", source_dir=cfg.policy)
        if models.critic is not None:
            save_value_model(models.critic, tmp / "critic")
        else:
            torch.save(models.value_head.state_dict(), tmp / "value_head.pt")
        torch.save({"optimizers": [o.state_dict() for o in opts.all()],
                    "schedules": [s.state_dict() for s in schedules],
                    "rng": rng_state(), "state": dataclasses.asdict(state)}, tmp / STATE_FILE)
    return save_atomically(cfg.output_dir, state.iteration, write, cfg.train.keep_checkpoints)


def load_ppo_checkpoint(path: Path, cfg: PPOConfig, models: PPOModels, opts: Optimizers, schedules) -> PPOState:
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
    device = next(models.policy.parameters()).device
    with torch.no_grad():
        models.policy.load_state_dict(load_model(path / "policy", dtype=cfg.train.dtype, device=device).state_dict())
        if models.critic is not None:
            models.critic.load_state_dict(load_value_model(path / "critic", dtype=cfg.train.dtype,
                                                           device=device).state_dict())
        else:
            models.value_head.load_state_dict(torch.load(path / "value_head.pt", map_location=device))
    for o, s in zip(opts.all(), saved["optimizers"]):
        o.load_state_dict(s)
    for sched, s in zip(schedules, saved["schedules"]):
        sched.load_state_dict(s)
    set_rng_state(saved["rng"])
    return PPOState(**saved["state"])


def ptx_loss_fn(cfg: PPOConfig, tokenizer, models: PPOModels, state: PPOState, device) -> Optional[Callable]:
    """The PPO-ptx term: next-token NLL of the policy on the next demonstration micro-batch."""
    if cfg.ppo.ptx_coef == 0:
        return None
    data = DataConfig(train_file=cfg.ptx_file, eval_fraction=0.0)
    examples = load_examples(data, tokenizer, "sft", cfg.seed).train
    position = TrainState(**state.ptx)
    stream = micro_batches(examples, data.tokens_per_batch, cfg.seed, position)

    def loss():
        epoch, index, batch = next(stream)
        state.ptx.update(epoch=epoch, batch_index=index + 1)
        batch = to_device(collate_sft(batch), device)
        with models.autocast():
            return sft_loss(models.policy, batch, {"tokens": batch.num_targets})[0]
    return loss


def run_ppo(cfg: PPOConfig, reward_fn: Optional[Callable] = None,
            evaluate: Optional[Callable[[PPOModels], dict]] = None) -> Path:
    """Train per `cfg`; returns the exported policy directory (RUN_DIR/final).

    reward_fn: a Python scorer fn(prompt_texts, response_texts) -> floats, instead of cfg.reward_fn.
    evaluate: called with the models after every logged iteration; its metrics are logged as "eval".
    """
    from transformers import AutoTokenizer  # deferred: importing transformers is slow

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
    prompts = load_prompts(cfg.prompts_file, tokenizer, cfg.rollout.max_prompt_length)
    models = build_models(cfg, device, tokenizer, reward_fn)
    opts, schedules = build_optimizers(models, cfg)
    state = PPOState(kl_coef=cfg.reward.kl_coef)
    resume_from = latest_checkpoint(cfg.output_dir) if cfg.train.resume else None
    if resume_from is not None:
        state = load_ppo_checkpoint(resume_from, cfg, models, opts, schedules)
    run = RunLog(cfg.output_dir, cfg, cfg.train.iterations, state.iteration, cfg.train.progress, cfg.train.tensorboard)
    try:
        run.log("info", state.iteration, {"prompts": len(prompts), "kv_pool_bytes": models.actor.kv_pool_bytes,
                                          "resumed_from": str(resume_from) if resume_from else None})
        _loop(cfg, models, opts, schedules, state, prompts, tokenizer, device, run, evaluate)
    finally:
        run.close()
    final = Path(cfg.output_dir) / "final"
    save_model(models.policy, final, source_dir=cfg.policy)
    if models.critic is not None:
        save_value_model(models.critic, Path(cfg.output_dir) / "final_critic")
    return final


def _loop(cfg, models, opts, schedules, state, prompts, tokenizer, device, run, evaluate):
    kl_ctl = KLController(state.kl_coef, cfg.reward.kl_target, cfg.reward.kl_horizon)
    moments = RunningMoments()
    if state.moments:
        moments.load_state_dict(state.moments)
    ptx_loss = ptx_loss_fn(cfg, tokenizer, models, state, device)
    per_iteration = cfg.rollout.prompts_per_iteration
    while state.iteration < cfg.train.iterations:
        it = state.iteration
        timer = PhaseTimer(device)
        batch = [prompts[i] for i in prompt_indices(len(prompts), per_iteration, cfg.seed, it)]
        rollout, metrics = make_rollout(models, batch, cfg, kl_ctl.value, moments, cfg.seed * 1_000_003 + it, timer)
        if cfg.reward.kl_ceiling is not None and metrics["kl"] > cfg.reward.kl_ceiling:
            run.log("info", it, {"stopped": f"KL {metrics['kl']:.4g} > reward.kl_ceiling {cfg.reward.kl_ceiling}"})
            raise KLCeilingExceeded(f"iteration {it}: KL to the reference {metrics['kl']:.4g} exceeds "
                                    f"reward.kl_ceiling={cfg.reward.kl_ceiling}; stopping (reward hacking guard)")
        with timer.phase("train"):
            metrics.update(ppo_update(models, opts, rollout, cfg, cfg.seed + it, ptx_loss))
        metrics["tokens_per_s_train"] = cfg.ppo.epochs * int(rollout.mask.sum()) / max(timer.seconds["train"], 1e-9)
        metrics["lr"] = schedules[0].get_last_lr()[0]
        for s in schedules:
            s.step()
        kl_ctl.update(metrics["kl"], rollout.mask.shape[0])
        state.iteration, state.kl_coef, state.moments = it + 1, kl_ctl.value, moments.state_dict()
        if state.iteration % cfg.train.log_every == 0 or state.iteration == cfg.train.iterations:
            run.log("train", state.iteration, {**metrics, **timer.metrics()})
            if evaluate is not None:
                run.log("eval", state.iteration, evaluate(models))
        if (cfg.train.save_every and state.iteration % cfg.train.save_every == 0) or state.iteration == cfg.train.iterations:
            save_ppo_checkpoint(cfg, state, models, opts, schedules)
