"""Options a stage would not read in the config given: refused in one line, never silently ignored.

An option set away from its default where the rest of the config leaves it unread (GRPO's
optim.grad_accum_steps: one optimizer step per minibatch; lora.alpha without lora.rank) would let
a user believe it acts. Each rule names the option, its value, why it is not read and what to set
instead. The configs' __post_init__ call `refuse_ignored`. Torch-free.
"""
from __future__ import annotations

import dataclasses

Rule = tuple[str, bool, str]  # (dotted option, whether it is set but unread, why it is not read)


def is_set(section, name: str) -> bool:
    """Whether option `name` of dataclass `section` differs from its field's default."""
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return getattr(section, name) != default


def lora_rules(lora, section: str) -> list[Rule]:
    """A `lora`-like section's options other than rank, when rank is 0 (no adapters)."""
    return [(f"{section}.{name}", not lora.enabled and is_set(lora, name),
             f"without adapters ({section}.rank=0); set {section}.rank > 0 to train adapters")
            for name in ("alpha", "dropout", "target_modules")]


def supervised_rules(cfg) -> list[Rule]:
    """SFT's and the reward model's: the eval options, LoRA's."""
    data, train = cfg.data, cfg.train
    no_eval = not data.eval_file and data.eval_fraction == 0
    unread_fraction = (bool(data.eval_file) and data.eval_fraction != 0
                       and is_set(data, "eval_fraction"))
    return [("train.eval_every", no_eval and train.eval_every > 0,
             "without eval data (no data.eval_file, data.eval_fraction=0); set one of them"),
            ("data.eval_fraction", unread_fraction,
             "with data.eval_file set (evaluation uses that file); unset one of them"),
            *lora_rules(cfg.lora, "lora")]


def rl_rules(cfg) -> list[Rule]:
    """PPO's and GRPO's."""
    rollout, ppo, reward = cfg.rollout, cfg.ppo, cfg.reward
    return [("optim.grad_accum_steps", cfg.optim.grad_accum_steps != 1,
             "by ppo or grpo, which take one optimizer step per minibatch: set ppo.minibatch_size "
             "(the rows of a step) and ppo.microbatch_size or ppo.tokens_per_microbatch (its "
             "forwards)"),
            ("critic_lr", cfg.critic_lr is not None and cfg.critic == "none",
             "without a critic (critic=none)"),
            ("ptx_file", bool(cfg.ptx_file) and ppo.ptx_coef == 0,
             "with ppo.ptx_coef=0; set ppo.ptx_coef > 0"),
            ("rollout.max_sampling_rounds",
             is_set(rollout, "max_sampling_rounds") and not rollout.dynamic_sampling,
             "without rollout.dynamic_sampling=true"),
            ("rollout.overlong_penalty",
             is_set(rollout, "overlong_penalty") and rollout.overlong_buffer == 0,
             "without rollout.overlong_buffer > 0"),
            ("ppo.is_cap", is_set(ppo, "is_cap") and ppo.is_mode != "tis",
             "without ppo.is_mode=tis"),
            ("ppo.is_low", is_set(ppo, "is_low") and ppo.is_mode != "mis",
             "without ppo.is_mode=mis"),
            ("ppo.is_high", is_set(ppo, "is_high") and ppo.is_mode != "mis",
             "without ppo.is_mode=mis"),
            ("reward.kl_horizon", is_set(reward, "kl_horizon") and reward.kl_target is None,
             "without reward.kl_target (the adaptive KL controller)"),
            ("reward.fn_timeout_s", is_set(reward, "fn_timeout_s") and cfg.reward_model is not None,
             "with reward_model (no reward function is called)"),
            *lora_rules(cfg.lora, "lora"), *lora_rules(cfg.critic_lora, "critic_lora")]


def refuse_ignored(rules: list[Rule], config) -> None:
    """ValueError naming the option of the first rule that holds, its value in `config`, and why."""
    for key, ignored, why in rules:
        if ignored:
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            raise ValueError(f"{key}={value!r} would be ignored: it is not read {why}")
