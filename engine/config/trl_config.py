"""TRL 1.16's `GRPOConfig` and `DistillationConfig` read as ours: each TRL field either translates
to our option(s), named by dotted key path (so the translation holds however our config classes
are composed), or is refused in one line of its own. Torch-free; TRL is never imported here (its
config arrives as an object).

Rules: a field with a translation is translated at whatever value it holds, TRL's default
included (TRL's `learning_rate` 1e-6 is the run's `optim.lr`); a field without one is refused when
its value differs from TRL's default (a default TRL field leaves ours at our default: TRL's
`lr_scheduler_type` "linear" is not ours, and only a value someone set is refused); the vLLM
fields are inert without `use_vllm` (as in TRL). `TRANSLATIONS[name]` is the table of config
class `name`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .io import ConfigError


class Untranslatable(Exception):
    """A TRL field's value that no option of ours expresses; its message says why."""


Translate = Callable[[Any, Any], dict]     # (value, the TRL config) -> {our dotted key: value}

TRL_CLASSES = ("GRPOConfig", "DistillationConfig")
OURS = {"GRPOConfig": "GRPOConfig", "DistillationConfig": "DistillConfig"}


def to(*keys: str, convert: Callable[[Any], Any] = lambda value: value) -> Translate:
    """The value (converted) into each of our keys."""
    return lambda value, _: {key: convert(value) for key in keys}


def unless_none(key: str) -> Translate:
    """The value into `key`, None leaving ours at its default."""
    return lambda value, _: {} if value is None else {key: value}


def only(allowed, why: str, then: dict | None = None) -> Translate:
    """Nothing (or `then`) for a value in `allowed`; refused with `why` otherwise."""
    def translate(value, _):
        if value not in allowed:
            raise Untranslatable(why)
        return dict(then or {})
    return translate


def _positive_int(key: str, what: str) -> Translate:
    def translate(value, _):
        if value != int(value) or value < 1:
            raise Untranslatable(f"ours takes {what} as a whole number >= 1")
        return {key: int(value)}
    return translate


def _precision(value, config) -> dict:
    if config.fp16:
        raise Untranslatable("fp16 mixed precision: ours trains in bf16-mixed or fp32")
    return {"train.precision": "bf16-mixed" if value else "fp32"}


def _save_strategy(value, _) -> dict:
    value = getattr(value, "value", value)
    if value == "no":
        return {"train.save_every": 0}
    if value != "steps":
        raise Untranslatable("ours saves every train.save_every iterations: 'steps' or 'no'")
    return {}


def _save_steps(value, config) -> dict:
    return (_positive_int("train.save_every", "save_steps")(value, config)
            if getattr(config.save_strategy, "value", config.save_strategy) == "steps" else {})


def _report_to(value, _) -> dict:
    names = [value] if isinstance(value, str) else list(value or [])
    trackers = ("tensorboard", "wandb", "mlflow", "none")
    if any(name not in trackers for name in names):
        raise Untranslatable(f"ours reports to {', '.join(trackers)}")
    return {"train.report_to": names} if names else {}


def _max_steps(value, _) -> dict:
    return {"train.iterations": int(value)} if value > 0 else {}


def _warmup(value, _) -> dict:
    if 0 < value < 1:
        raise Untranslatable("a warmup ratio: ours takes optim.warmup_steps, a number of steps")
    return {"optim.warmup_steps": int(value)}


def _generation_batch(value, config) -> dict:
    if value % config.num_generations:
        raise Untranslatable(f"not a multiple of num_generations ({config.num_generations})")
    return {"rollout.prompts_per_iteration": value // config.num_generations}


def _loss_type(value, config) -> dict:
    aggregations = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
                    "dr_grpo": "seq-mean-token-sum-norm"}
    if value not in aggregations:
        raise Untranslatable("the engine's update runs grpo, bnpo, dr_grpo and dapo (the "
                             "kernels' FusedLinearGRPOLoss has every TRL loss type)")
    extra = {"ppo.loss_agg_norm": config.max_completion_length} if value == "dr_grpo" else {}
    return {"ppo.agg": aggregations[value], **extra}


def _scale_rewards(value, _) -> dict:
    estimators = {"group": "grpo", True: "grpo", "none": "dr_grpo", False: "dr_grpo"}
    if value not in estimators:
        raise Untranslatable("ours scales by the group's std (group) or not at all (none)")
    return {"ppo.estimator": estimators[value]}


def _delta(value, config) -> dict:
    high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    if value is None:
        return {}
    if not value > 1 + high:
        raise Untranslatable(f"ours clips at delta as dual_clip, which needs delta > "
                             f"1 + epsilon_high = {1 + high}")
    return {"ppo.dual_clip": value}


def _bias_corrected_kl(value, config) -> dict:
    if value and config.beta != 0:
        raise Untranslatable("ours takes the KL to the reference without the ratio correction: "
                             "set use_bias_correction_kl=False (or beta=0)")
    return {}


def _vllm(value, _) -> dict:
    if value:
        raise Untranslatable("ours samples with its own engine in the trainer's process")
    return {}


# TrainingArguments' fields both configs share.
COMMON: dict[str, Translate] = {
    "output_dir": to("output_dir"),
    "seed": to("seed"),
    "learning_rate": to("optim.lr"),
    "weight_decay": to("optim.weight_decay"),
    "adam_beta1": to("optim.beta1"),
    "adam_beta2": to("optim.beta2"),
    "adam_epsilon": to("optim.eps"),
    "max_grad_norm": to("optim.max_grad_norm"),
    "warmup_steps": _warmup,
    # TRL's optimizer step: per_device_train_batch_size x gradient_accumulation_steps completions
    "per_device_train_batch_size": lambda value, config: {
        "ppo.minibatch_size": value * config.gradient_accumulation_steps},
    "gradient_accumulation_steps": lambda value, _: {},   # read with the batch size
    "max_steps": _max_steps,
    "logging_steps": _positive_int("train.log_every", "logging_steps"),
    "save_strategy": _save_strategy,
    "save_steps": _save_steps,
    "save_total_limit": unless_none("train.keep_checkpoints"),
    "gradient_checkpointing": to("train.gradient_checkpointing"),
    "activation_checkpointing": to("train.gradient_checkpointing"),
    "bf16": _precision,
    "fp16": lambda value, config: {},    # read by bf16's translation
    "use_cpu": lambda value, _: {"train.device": "cpu"} if value else {},
    "report_to": _report_to,
    "disable_tqdm": to("train.progress", convert=lambda value: not value),
    # generation, as TRL's GRPO and distillation trainers sample
    "max_completion_length": to("rollout.max_new_tokens"),
    "top_p": to("rollout.top_p"),
    "top_k": to("rollout.top_k", convert=lambda value: value or 0),
    "min_p": only((None, 0, 0.0), "ours samples with temperature, top_k and top_p"),
    "repetition_penalty": only((1, 1.0), "ours samples with temperature, top_k and top_p"),
    "use_vllm": _vllm,
}

GRPO: dict[str, Translate] = {
    **COMMON,
    "num_generations": to("rollout.samples_per_prompt"),
    "generation_batch_size": _generation_batch,
    "steps_per_generation": lambda value, _: {},    # read through generation_batch_size
    "num_iterations": to("ppo.epochs"),
    "temperature": to("rollout.temperature"),
    # TRL's GRPO has no KL in the reward: its beta is the KL loss term's weight
    "beta": lambda value, _: {"ppo.kl_loss_coef": value, "reward.kl_coef": 0.0},
    "epsilon": to("ppo.clip_eps"),
    "epsilon_high": unless_none("ppo.clip_eps_high"),
    "delta": _delta,
    "importance_sampling_level": to("ppo.ratio_level"),
    "loss_type": _loss_type,
    "scale_rewards": _scale_rewards,
    "reward_weights": unless_none("reward.weights"),
    "entropy_coef": to("ppo.ent_coef"),
    "use_bias_correction_kl": _bias_corrected_kl,
    "router_aux_loss_coef": unless_none("moe.router_aux_loss_coef"),
}

DISTILL: dict[str, Translate] = {
    **COMMON,
    # (TRL samples one completion per prompt; ours rollout.samples_per_prompt of each prompt)
    "teacher_model_name_or_path": unless_none("teacher"),
    "temperature": to("rollout.temperature", "distill.temperature"),
    "beta": to("distill.beta"),
}

TRANSLATIONS = {"GRPOConfig": GRPO, "DistillationConfig": DISTILL}


def is_trl_config(config) -> bool:
    """Whether `config` is TRL's GRPOConfig or DistillationConfig (by class, TRL not imported)."""
    kind = type(config)
    return kind.__module__.split(".")[0] == "trl" and kind.__name__ in TRL_CLASSES


def _shown(value) -> str:
    """A value as its field is written (an enum by its value)."""
    return repr(getattr(value, "value", value))


def _inert(name: str, config) -> bool:
    return name.startswith("vllm_") and not getattr(config, "use_vllm", False)


def translate(config, ours: str) -> dict:
    """Our nested options dict for TRL config `config`, to build our config class named `ours`;
    a ConfigError listing, one line each, the fields with no translation that were set and the
    values no option of ours expresses."""
    name = type(config).__name__
    if OURS[name] != ours:
        raise ConfigError(f"args: TRL's {name} configures fusedrl.engine's "
                          f"{OURS[name].replace('Config', 'Trainer')}, not its "
                          f"{ours.replace('Config', 'Trainer')}")
    table = TRANSLATIONS[name]
    defaults = type(config)(output_dir=config.output_dir, use_cpu=config.use_cpu)
    flat, refused = {}, []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in table:
            try:
                flat.update(table[field.name](value, config))
            except Untranslatable as why:
                refused.append(f"  {field.name}={_shown(value)}: {why}")
        elif value != getattr(defaults, field.name) and not _inert(field.name, config):
            refused.append(f"  {field.name}={_shown(value)}: no fusedrl option (TRL's default "
                           f"{_shown(getattr(defaults, field.name))} is the only value taken)")
    if refused:
        raise ConfigError(f"args: TRL's {name} fields fusedrl cannot take ({len(refused)}):\n"
                          + "\n".join(refused))
    return nested(flat)


def nested(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict = {}
    for key, value in flat.items():
        *heads, leaf = key.split(".")
        node = out
        for head in heads:
            node = node.setdefault(head, {})
        node[leaf] = value
    return out
