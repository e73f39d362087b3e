"""Did-you-mean by meaning: option names users bring from Hugging Face transformers'
TrainingArguments, TRL's SFT/PPO/GRPO configs and torchtune recipes, mapped to ours. Torch-free.

Each foreign name lists our keys in order of preference; `meaning_of` returns the first that the
config class has (`learning_rate` is `optim.lr` in every stage; `per_device_train_batch_size` is
`data.tokens_per_batch` in SFT/RM and `ppo.minibatch_size` in PPO). A note says where the meaning
differs, e.g. our micro-batches are a token budget, not a number of sequences.
"""
from __future__ import annotations

import dataclasses
import typing

_TOKENS = "a token budget per micro-batch and rank, not a number of sequences"
_PER_RANK = "per rank"

# foreign name -> ((our dotted key, note or ""), ...), first match wins
ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    # transformers TrainingArguments (also TRL's SFTConfig, PPOConfig, GRPOConfig)
    "learning_rate": (("optim.lr", ""),),
    "per_device_train_batch_size": (("data.tokens_per_batch", _TOKENS),
                                    ("ppo.minibatch_size", _PER_RANK)),
    "per_device_eval_batch_size": (("data.tokens_per_batch", _TOKENS),),
    "train_batch_size": (("data.tokens_per_batch", _TOKENS), ("ppo.minibatch_size", _PER_RANK)),
    "batch_size": (("data.tokens_per_batch", _TOKENS), ("ppo.minibatch_size", _PER_RANK)),
    "gradient_accumulation_steps": (("optim.grad_accum_steps", _PER_RANK),),
    "num_train_epochs": (("train.epochs", ""),),
    "max_steps": (("train.max_steps", ""), ("train.iterations", "")),
    "max_grad_norm": (("optim.max_grad_norm", ""),),
    "warmup_steps": (("optim.warmup_steps", ""),),
    "num_warmup_steps": (("optim.warmup_steps", ""),),
    "weight_decay": (("optim.weight_decay", ""),),
    "adam_beta1": (("optim.beta1", ""),),
    "adam_beta2": (("optim.beta2", ""),),
    "adam_epsilon": (("optim.eps", ""),),
    "logging_steps": (("train.log_every", ""),),
    "save_steps": (("train.save_every", ""),),
    "eval_steps": (("train.eval_every", ""),),
    "save_total_limit": (("train.keep_checkpoints", ""),),
    "gradient_checkpointing": (("train.gradient_checkpointing", ""),),
    "bf16": (("train.precision", "bf16-mixed | fp32 | auto"),),
    "fp16": (("train.precision", "bf16-mixed | fp32 | auto"),),
    "max_seq_length": (("data.max_length", ""),),
    "max_length": (("data.max_length", ""),),
    "max_prompt_length": (("data.max_prompt_length", ""), ("rollout.max_prompt_length", "")),
    "model_name_or_path": (("model", ""), ("policy", "")),
    "sft_model_path": (("policy", ""), ("model", "")),
    "reward_model_path": (("reward_model", ""),),
    "dataset_name": (("data.train_file", "a local data file or save_to_disk directory"),
                     ("prompts_file", "a local data file or save_to_disk directory")),
    "dataset_text_field": (("data.text_column", ""),),
    # TRL PPO / GRPO
    "num_ppo_epochs": (("ppo.epochs", ""),),
    "cliprange": (("ppo.clip_eps", ""),),
    "cliprange_value": (("ppo.vf_clip", ""),),
    "epsilon": (("ppo.clip_eps", ""),),
    "epsilon_high": (("ppo.clip_eps_high", ""),),
    "kl_coef": (("reward.kl_coef", ""),),
    "beta": (("ppo.kl_loss_coef", ""), ("reward.kl_coef", "")),
    "response_length": (("rollout.max_new_tokens", ""),),
    "max_completion_length": (("rollout.max_new_tokens", ""),),
    "num_generations": (("rollout.samples_per_prompt", ""),),
    "whiten_rewards": (("reward.normalize", ""),),
    "total_episodes": (("train.iterations", "iterations of rollout.prompts_per_iteration prompts"),
                       ),
    # torchtune recipes
    "epochs": (("train.epochs", ""), ("ppo.epochs", "")),
    "max_steps_per_epoch": (("train.max_steps", ""),),
    "clip_grad_norm": (("optim.max_grad_norm", ""),),
    "enable_activation_checkpointing": (("train.gradient_checkpointing", ""),),
    "dtype": (("train.precision", "bf16-mixed | fp32 | auto"),),
    "device": (("train.device", ""),),
    "ppo_epochs": (("ppo.epochs", ""),),
    "ppo_batch_size": (("ppo.minibatch_size", _PER_RANK),),
    "gradient_accumulation": (("optim.grad_accum_steps", _PER_RANK),),
    "kl_coeff": (("reward.kl_coef", ""),),
    "max_generated_tokens": (("rollout.max_new_tokens", ""),),
    "temperature": (("rollout.temperature", ""),),
    "gamma": (("ppo.gamma", ""),),
    "lmbda": (("ppo.lam", ""),),
    "vf_coef": (("ppo.vf_coef", ""),),
    "value_coeff": (("ppo.vf_coef", ""),),
}


def has_key(cls, dotted: str) -> bool:
    """Whether config dataclass `cls` has the option `dotted` (e.g. "optim.lr")."""
    head, _, rest = dotted.partition(".")
    fields = {f.name for f in dataclasses.fields(cls)}
    if head not in fields:
        return False
    tp = typing.get_type_hints(cls)[head]
    return has_key(tp, rest) if rest else not dataclasses.is_dataclass(tp)


def meaning_of(cls, key: str) -> tuple[str, str] | None:
    """(our key, note) for a foreign option name `key` (its last dotted part) that `cls` has, else
    None."""
    leaf = key.rsplit(".", 1)[-1].lower()
    return next(
        ((ours, note) for ours, note in ALIASES.get(leaf, ())
         if has_key(cls, ours) and ours != key), None)
