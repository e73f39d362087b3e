"""Which options go together: one table of the pairs that are refused (before any model loads, in
one line naming both options and why), and the rules of options set where nothing reads them.
Every pair of rollout and training options not in INCOMPATIBLE runs in every rollout mode
(tests/engine/config/test_compatibility.py walks them all). Torch-free.

A pair's options are dotted config keys; `policy.moe` stands for a mixture-of-experts model (PPO's
policy, SFT's model), read from its config.json at the run's start (refuse_incompatible(cfg,
moe=...)), unknown (None) when the config alone is checked. The table is every stage's: a pair
holds in a config that has both options (SFT's and RM's have no rollout). Every config checks it
when built, and engine/parallel/validate.py again at a run's start (a config changed in place
since); what depends on the number of GPUs or a model's shape stays there. The engine refuses
its own arguments beside its exact mode by a rule of its own (engine/inference/exact_pairs.py: no
config there), with the same reasons (engine/exact_reasons.py); `fusedrl <stage> --help` and
docs/runs.md show this table (table_lines, markdown_table).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .. import exact_reasons
from ..errors import ConfigValueError
from .estimators import CRITIC_ESTIMATORS, TURN_ESTIMATORS


def option_value(config, key: str):
    """The value of dotted `key` in `config` (a section's fields by attribute)."""
    value = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


def has_option(config, key: str) -> bool:
    """Whether `config` has dotted option `key` (SFT's config has no rollout section)."""
    try:
        option_value(config, key)
    except AttributeError:
        return False
    return True


# When an option is in use where that is not simply a true value (a size of 1 is off).
_IN_USE: dict[str, Callable] = {
    "train.tensor_parallel": lambda v: v > 1,
    "train.context_parallel": lambda v: v > 1,
    "train.expert_parallel": lambda v: v > 1,
    "train.data_parallel": lambda v: v != "shard",
    "train.prefix_sharing": lambda v: v is True,  # auto turns itself off where it does not run
    "critic": lambda v: v != "none",
}


def is_on(config, key: str) -> bool:
    """Whether option `key` is in use: set away from its off value (False, 0, None, an empty
    list; a parallel size of 1, train.data_parallel=shard, critic=none)."""
    value = option_value(config, key)
    return bool(_IN_USE[key](value) if key in _IN_USE else value)


MOE = "policy.moe"


@dataclass(frozen=True)
class Pair:
    """Two options refused together: `first` and `second` dotted keys (or MOE), `why` (a clause);
    `moe`: only with a mixture-of-experts policy; `beside`: a third option the pair is refused
    beside only (named in the line too); `applies(config)`: when the pair holds beyond its options
    being on (default: always)."""
    first: str
    second: str
    why: str
    moe: bool = False
    beside: str | None = None
    applies: Callable | None = None

    def options(self) -> tuple[str, ...]:
        """Its dotted options, MOE included (first, second, then `beside`)."""
        return (self.first, self.second) + ((self.beside,) if self.beside else ())

    def holds(self, config, moe: bool | None) -> bool:
        """Whether `config` sets both options (with `moe`: the policy is a mixture of experts)."""
        if (self.moe or MOE in self.options()) and not moe:
            return False
        keys = [k for k in self.options() if k != MOE]
        both = all(has_option(config, k) and is_on(config, k) for k in keys)
        return both and (self.applies is None or bool(self.applies(config)))

    def message(self, config, names: dict | None = None) -> str:
        """The refusal's one line; `names`: how the caller calls an option (LLM's arguments)."""
        names = names or {}
        shown = [("a mixture-of-experts model" if k == MOE
                  else f"{names.get(k, k)}={option_value(config, k)!r}") for k in self.options()]
        beside = f" beside {shown[2]}" if self.beside else ""
        return (f"{shown[0]} with {shown[1]}{beside}: not supported ({self.why}); set one of them "
                "off")


_CP, _EP, _TP = "train.context_parallel", "train.expert_parallel", "train.tensor_parallel"
_ROWS = "it forwards rows whole, which a context group splits"
_MASKS = "each tensor rank would draw its own dropout mask on the same input"

INCOMPATIBLE: tuple[Pair, ...] = (
    Pair("reward_model", "reward_fn", "the run is scored by one of them"),
    Pair("rollout.partial_rollouts", "rollout.exact",
         "a carried answer mixes tokens of older weights, which exact's bitwise old log-probs "
         "cannot reproduce"),
    Pair("rollout.tools", "rollout.environment",
         "an environment that wants tools calls them in its step"),
    Pair("rollout.speculative_tokens", "rollout.exact", exact_reasons.SPECULATIVE_VERIFY),
    Pair("rollout.prefill_chunk", "rollout.exact", exact_reasons.CHUNKED_PREFILL),
    Pair("rollout.dynamic_sampling", "ppo.estimator",
         "it drops groups of equal scores: it needs a group estimator",
         applies=lambda c: c.ppo.estimator in CRITIC_ESTIMATORS),
    Pair("rollout.exact", "lora.dropout",
         "the sampler's and the trainer's forwards would draw different dropout masks"),
    Pair("ppo.turn_advantages", "ppo.estimator",
         f"turn-level group advantages are those of {', '.join(TURN_ESTIMATORS)}",
         applies=lambda c: c.ppo.estimator not in TURN_ESTIMATORS),
    Pair("reward.per_turn", "reward.normalize",
         "a turn's reward sits where the environment gave it, unnormalized"),
    Pair("reward.per_turn", "reward.clip",
         "a turn's reward sits where the environment gave it, unclipped"),
    Pair("rollout.exact", MOE, exact_reasons.mixture_of_experts("rollout.routing_replay")),
    Pair("rollout.overlap_decode", "rollout.routing_replay",
         "an MoE policy's decode step keeps its expert choices from a buffer that a step "
         "launched ahead writes first; null launches ahead where it can", moe=True),
    # Parallel layouts: the pairs refused whatever the number of GPUs (validate.py checks the
    # sizes against the ranks and the model).
    Pair(_CP, "train.expert_parallel", "expert groups are not laid out beside context groups"),
    Pair(_CP, "train.data_parallel",
         "FSDP2 shards over the data x context ranks: train.data_parallel=shard"),
    Pair(_CP, "lora.rank", "adapters beside tensor slices are not shown to train as one process "
         "does", beside=_TP),
    Pair(_CP, MOE, "its router losses are per forward"),
    Pair(_CP, "reward_model", "the score head reads whole rows"),
    Pair(_CP, "teacher", "distillation runs the teacher and the student on whole rows"),
    Pair(_CP, "train.prefix_sharing", _ROWS),
    Pair(_CP, "rollout.exact", _ROWS),
    Pair(_CP, "ppo.ptx_coef", "the PPO-ptx forwards are not split over a context group"),
    Pair(_EP, "train.tensor_parallel", "experts are sharded over whole models, not tensor slices"),
    Pair(_EP, "lora.rank", "the experts' adapters are not sharded over expert groups"),
    Pair(_EP, "train.optimizer_offload", "the expert groups' state is not offloaded"),
    Pair(_EP, "train.data_parallel",
         "the experts' FSDP2 shards span the expert groups: train.data_parallel=shard"),
    Pair(_TP, "train.data_parallel",
         "not at hybrid: the tensor-parallel data groups shard the slices (shard) or copy them "
         "(replicate: across nodes, at T = the GPUs of a node)",
         applies=lambda c: c.train.data_parallel == "hybrid"),
    Pair(_TP, "lora.dropout", _MASKS, applies=lambda c: c.lora.enabled),
    Pair(_TP, "critic_lora.dropout", _MASKS, applies=lambda c: c.critic_lora.enabled),
    Pair(_TP, "rollout.exact", exact_reasons.TENSOR_PARALLEL),
)


def refuse_incompatible(config, moe: bool | None = None, names: dict | None = None) -> None:
    """ConfigValueError (one line naming both options) for the first pair of INCOMPATIBLE that
    `config` (any stage's, or options by attribute) sets; `moe`: whether the policy (SFT's model) is
    a mixture of experts (None: not known yet, its pairs wait for the run's start); `names`: the
    options' names in the line, where the caller names them otherwise ({dotted key: name})."""
    for pair in INCOMPATIBLE:
        if pair.holds(config, moe):
            raise ConfigValueError(pair.message(config, names))


# What a vision-language policy (or SFT model) does not run with yet: (dotted option, why), refused
# by refuse_for_vision at the run's start, when the model's directory holds an image processor.
VISION_REFUSED: tuple[tuple[str, str], ...] = (
    ("rollout.tools", "a trajectory's later turns are rendered as text, with no image slot"),
    ("rollout.environment", "a trajectory's later turns are rendered as text, with no image slot"),
    ("ppo.ptx_coef", "the PPO-ptx data are read as text"),
    (_CP, "a row with images is not split over a context group"),
    ("train.optimizer_offload", "not shown with a vision tower"),
)

# Shown tensor-parallel with images (tests/engine/parallel/test_vision_tensor_parallel.py): SFT's
# model and the GRPO family's policy and reference. Not yet beside them: (option, what it names),
# refused at train.tensor_parallel > 1 where set; the stages' own options (teacher: distillation,
# beta_rm: the reward-model stage) name the stage by being there.
VISION_TP_UNSHOWN: tuple[tuple[str, str], ...] = (
    ("critic", "a critic"), ("reward_model", "a reward model scoring"),
    ("teacher", "distillation"), ("beta_rm", "the reward-model stage"))
_STAGE_OPTIONS = ("teacher", "beta_rm")


def refuse_for_vision(config) -> None:
    """ConfigValueError (one line) for the first option of VISION_REFUSED that `config` (a stage's
    config with a vision-language model) sets, for train.tensor_parallel > 1 beside what
    VISION_TP_UNSHOWN names, and for train.train_vision beside LoRA adapters
    (only the decoder's projections take adapters; the tower would be trained in full beside them,
    and the adapter export would leave it out)."""
    for key, why in VISION_REFUSED:
        if has_option(config, key) and is_on(config, key):
            raise ConfigValueError(f"{key}={option_value(config, key)!r} with a vision-language "
                                   f"model: not supported ({why}); set it off")
    for key, what in VISION_TP_UNSHOWN:
        if is_on(config, _TP) and has_option(config, key) and (
                key in _STAGE_OPTIONS or is_on(config, key)):
            raise ConfigValueError(
                f"train.tensor_parallel={config.train.tensor_parallel} with a vision-language "
                f"model and {what} ({key}): not shown yet (SFT and the GRPO family run "
                "tensor-parallel with images); set train.tensor_parallel=1")
    if config.train.train_vision and config.lora.enabled:
        raise ConfigValueError(
            f"train.train_vision=true with lora.rank={config.lora.rank}: not supported (adapters "
            "go on the decoder only, and their export would leave the trained tower out); train "
            "the tower in full without adapters, or keep it frozen")


def refuse_text_reward_model(reward_model: str | None, rm_config) -> None:
    """With a vision-language policy: ConfigValueError (one line) when `reward_model` (its
    directory, None: unused) is a text model (`rm_config`, its ModelConfig, describes no vision
    tower): the rollout's rows hold image tokens it would read as text, without the images."""
    if reward_model is not None and rm_config.vision is None:
        raise ConfigValueError(
            f"reward_model={reward_model!r} is a text model but the policy is a vision-language "
            "model: its rows' image tokens need a vision-language reward model (fusedrl rm on "
            "the policy's base), or score with reward functions")


def _class_has(config_cls, key: str) -> bool:
    """Whether config class `config_cls` has dotted option `key` (MOE: every stage's model)."""
    if key == MOE:
        return True
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    head, _, rest = key.partition(".")
    if head not in fields or not rest:
        return head in fields
    factory = fields[head].default_factory
    return factory is not dataclasses.MISSING and hasattr(factory(), rest)


def _shown(pair: Pair) -> str:
    names = ["a mixture-of-experts model" if k == MOE else k for k in pair.options()]
    return f"{names[0]} with {names[1]}" + (f" beside {names[2]}" if pair.beside else "")


def table_lines(config_cls=None) -> list[str]:
    """INCOMPATIBLE as text, one '  first with second: why' line a pair (those of `config_cls`'s
    options, None: all), as `fusedrl <stage> --help` shows it."""
    return [f"  {_shown(p)}: {p.why}" for p in INCOMPATIBLE
            if config_cls is None or all(_class_has(config_cls, k) for k in p.options())]


def markdown_table() -> str:
    """INCOMPATIBLE as the Markdown table docs/runs.md holds (a test keeps the two equal)."""
    rows = [f"| `{'` with `'.join(k for k in p.options()[:2])}`"
            + (f" beside `{p.beside}`" if p.beside else "") + f" | {p.why} |"
            for p in INCOMPATIBLE]
    return "\n".join(["| refused together | why |", "|---|---|", *rows]).replace(
        f"`{MOE}`", "a mixture-of-experts model")


# The rules of options set but unread: (dotted option, whether it is set but unread, why it is
# not read); refuse_ignored names the first that holds.
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


def offload_rule(cfg) -> Rule:
    """train.optimizer_offload beside adapters: every stage's."""
    return ("train.optimizer_offload", cfg.train.optimizer_offload and cfg.lora.enabled,
            "with lora.rank > 0 (the adapters are whole on every rank, no FSDP2-sharded model is "
            "trained: nothing offloads)")


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
            offload_rule(cfg), *lora_rules(cfg.lora, "lora")]


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
            ("rollout.max_sampling_rounds",
             is_set(rollout, "max_sampling_rounds") and rollout.partial_rollouts,
             "with rollout.partial_rollouts (the groups in flight top the next iteration up)"),
            ("reward.weights", reward.weights is not None and cfg.reward_model is not None,
             "with reward_model (the weights weigh reward functions)"),
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
            ("reward.per_turn", reward.per_turn and not rollout.multi_turn,
             "without rollout.tools or rollout.environment (an answer of one turn)"),
            ("reward.turn_gamma", is_set(reward, "turn_gamma") and not reward.per_turn,
             "without reward.per_turn=true"),
            ("reward.turn_gamma",
             is_set(reward, "turn_gamma") and ppo.estimator in CRITIC_ESTIMATORS,
             f"by ppo.estimator={ppo.estimator} (its returns discount per token: ppo.gamma)"),
            ("ppo.turn_advantages", ppo.turn_advantages and not reward.per_turn,
             "without reward.per_turn=true"),
            offload_rule(cfg), *lora_rules(cfg.lora, "lora"),
            *lora_rules(cfg.critic_lora, "critic_lora")]


def distill_rules(cfg) -> list[Rule]:
    """Distillation's beyond the RL rules: a reward given where distill.reward_coef=0 reads
    none."""
    reward = "reward_fn" if cfg.reward_fn else "reward_model"
    return [(reward, cfg.distill.reward_coef == 0 and bool(cfg.reward_fn or cfg.reward_model),
             "with distill.reward_coef=0 (the teacher alone); set distill.reward_coef > 0 to use "
             "it")]


def refuse_ignored(rules: list[Rule], config) -> None:
    """ConfigValueError (a ValueError) naming the option of the first rule that holds, its value
    in `config`, and why."""
    for key, ignored, why in rules:
        if ignored:
            raise ConfigValueError(f"{key}={option_value(config, key)!r} would be ignored: it "
                                   f"is not read {why}")
