"""Config of the PPO stage: plain dataclasses validated on construction, loadable from YAML with
`key=value` overrides (engine/config/io.py), usable from Python as a library. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .fields import check, check_fields, option
from .compatibility import refuse_incompatible, refuse_ignored, rl_rules
from .estimators import (AGGREGATIONS, CRITIC_ESTIMATORS, ESTIMATORS, AggregationName,
                         EstimatorName, described)
from .io import Loadable
from .lora import LoRAConfig
from .moe import RouterLossConfig
from .parallel_job import ParallelJob
from .rollout import AUTO_FORWARD_TOKENS, RolloutConfig
from .sandbox import SandboxConfig
from .train import DATA_SOURCE, OptimConfig, RunConfig

Critic = Literal["separate", "shared", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
RewardIsolation = Literal["process", "thread"]
# The longest reward.fn_timeout_s (some 11 days): a longer wait is no bound, and past the OS's
# largest timeout (threading.TIMEOUT_MAX) waiting would overflow.
MAX_FN_TIMEOUT_S = 1e6


@dataclass
class PromptDataConfig:
    prompt_column: str = option("the column of prompts_file read as the prompt (a string or a "
                                "message list); every other column goes to the reward functions",
                                "prompt")
    chat_template: Literal["auto", "none"] = option(
        "auto: string prompts go through the tokenizer's chat template as one user turn when it "
        "has one | none: string prompts are the policy's text as they are (a policy trained on "
        "plain strings); message lists always go through the template", "auto")

    def __post_init__(self):
        check_fields(self, "data.")
        check(bool(self.prompt_column), "data.prompt_column must name a column, got ''")


@dataclass
class UpdateConfig:
    epochs: int = option("PPO epochs over each rollout", 4)
    minibatch_size: int = option(
        "sequences per PPO minibatch update on each rank (under torchrun: x the "
        "number of ranks in all); a size not dividing the rollout's rows "
        "gives ceil(rows / size) minibatches of sizes as equal as the "
        "rows allow (said at start)", 16)
    microbatch_size: int | None = option(
        "sequences per forward/backward inside a minibatch; gradients are "
                                        "accumulated to the whole minibatch's (None = the "
                                        "minibatch at once)")
    tokens_per_microbatch: int | str | None = option(
        "token budget of one forward/backward inside a minibatch: rows (prompt + response tokens) "
        "are packed up to it, so each forward fills the GPU; it must hold one row "
        "(rollout.max_prompt_length + rollout.max_new_tokens); gradients are the whole "
        "minibatch's; under torchrun every rank runs the most forwards any rank needs. auto: the "
        "minibatch in one forward while minibatch_size full-length rows hold at most 16384 tokens, "
        "else packed to the larger of 16384 and one row (long answers); null or a microbatch_size "
        "set = by microbatch_size", "auto")
    clip_eps: float = option("ratio clip: [1 - clip_eps, 1 + clip_eps_high]", 0.2)
    clip_eps_high: float | None = option("upper ratio clip (default: clip_eps)")
    dual_clip: float | None = option("dual-clip bound c > 1 for negative advantages (None = off)")
    agg: AggregationName = option("loss aggregation: " + described(AGGREGATIONS), "token-mean")
    loss_agg_norm: float | None = option(
        "the constant of seq-mean-token-sum-norm (default: rollout.max_new_tokens)")
    ratio_level: Literal["token",
                         "sequence"] = option("token (PPO) | sequence (GSPO: length-normalized "
                                                       "sequence ratio, clipped per sequence)",
                                              "token")
    log_ratio_clamp: float = option(
        "clamp logp - old_logp to +-this before exp() (verl, OpenRLHF: 20)", 20.0)
    is_mode: Literal["tis", "mis", "off"] | None = option(
        "importance-sampling correction of the sampler / training log-prob gap: tis (truncated at "
        "is_cap) | mis (masked outside [is_low, is_high]) | off | null (tis with "
        "rollout.partial_rollouts, else off)")
    is_level: Literal["token",
                      "sequence"] = option("the IS weight per token or per sequence (product)",
                                           "token")
    is_cap: float = option("tis: the weight's upper bound", 2.0)
    is_low: float = option("mis: the band's lower bound", 0.5)
    is_high: float = option("mis: the band's upper bound", 2.0)
    vf_coef: float = option("weight of the value loss", 0.1)
    vf_clip: float | None = option("value clip around the rollout's values (None = off)", 0.2)
    ent_coef: float = option("weight of the entropy bonus", 0.0)
    ptx_coef: float = option("weight of the pretraining (PPO-ptx) loss on ptx_file", 0.0)
    estimator: EstimatorName = option(
        "advantage estimator: " + described(ESTIMATORS) + " (all but "
        + ", ".join(CRITIC_ESTIMATORS) + " critic-free, over each prompt's responses)", "gae")
    kl_loss_coef: float = option(
        "weight of the KL to the reference as a loss term (k3, GRPO style; 0 = off; "
        "reward.kl_coef puts it in the reward instead)", 0.0)
    gamma: float = option("discount", 1.0)
    lam: float = option("GAE lambda", 0.95)
    whiten_advantages: bool = option("normalize advantages over the rollout's valid tokens", True)
    max_approx_kl: float = option(
        "stop the epochs early once a minibatch's approx KL passes this (0 = off)", 0.0)
    turn_advantages: bool = option(
        "with reward.per_turn and a group estimator (grpo, dr_grpo): each turn of a trajectory is "
        "a unit of the group's statistics (AReaL's turn-level advantages): a turn's tokens get its "
        "discounted return to go (reward.turn_gamma) against the mean (and std) of every turn's "
        "of the group; false: one advantage per trajectory, from its discounted sum", False)

    def __post_init__(self):
        check_fields(self, "ppo.")
        check(self.epochs >= 1, f"ppo.epochs must be >= 1, got {self.epochs}")
        check(self.minibatch_size >= 1,
              f"ppo.minibatch_size must be >= 1, got {self.minibatch_size}")
        check(self.microbatch_size is None or self.microbatch_size >= 1,
               f"ppo.microbatch_size must be >= 1 or null, got {self.microbatch_size}")
        check(self.tokens_per_microbatch in (None, "auto")
              or (isinstance(self.tokens_per_microbatch, int)
                  and self.tokens_per_microbatch >= 1),
              "ppo.tokens_per_microbatch must be >= 1, auto or null, got "
              f"{self.tokens_per_microbatch!r}")
        check(self.tokens_per_microbatch in (None, "auto") or self.microbatch_size is None,
              f"ppo.tokens_per_microbatch={self.tokens_per_microbatch} and ppo.microbatch_size="
              f"{self.microbatch_size}: set one of them (micro-batches by tokens or by rows)")
        check(0 <= self.gamma <= 1, f"ppo.gamma must be in [0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, f"ppo.lam must be in [0, 1], got {self.lam}")
        for name in ("vf_coef", "ent_coef", "ptx_coef", "max_approx_kl", "kl_loss_coef"):
            check(getattr(self, name) >= 0, f"ppo.{name} must be >= 0, got {getattr(self, name)}")
        # What the loss kernels would reject mid-run (fusedrl.kernels.ppo_policy_loss /
        # ppo_value_loss).
        for name in ("clip_eps", "clip_eps_high", "loss_agg_norm", "log_ratio_clamp", "vf_clip"):
            value = getattr(self, name)
            check(value is None or value > 0, f"ppo.{name} must be > 0, got {value}")
        check(self.dual_clip is None or self.dual_clip > 1,
              f"ppo.dual_clip must be > 1 or null, got {self.dual_clip}")
        check(0 < self.is_low <= 1 <= self.is_high and self.is_cap >= 1,
              "ppo.is_low, ppo.is_high, ppo.is_cap: need 0 < is_low <= 1 <= is_high and is_cap >= "
              "1, got "
              f"{self.is_low}, {self.is_high}, {self.is_cap}")


@dataclass
class RewardConfig:
    kl_coef: float = option("initial coefficient beta of the per-token KL penalty", 0.05)
    kl_target: float | None = option("adaptive beta: target KL per sequence (None = fixed beta)")
    kl_horizon: int = option("adaptive beta: horizon in sequences of the proportional controller",
                             10000)
    kl_estimator: KLEstimator = option("per-token KL estimator in the reward: k1 | k2 | k3", "k1")
    normalize: bool = option("normalize scores by their running mean and std", False)
    clip: float | None = option("clip (normalized) scores to +-clip (None = off)")
    per_turn: bool = option(
        "multi-turn: each environment reward sits at the last model token of its turn (PPO's GAE "
        "and critic see it there; a group estimator scores the trajectory by its discounted sum, "
        "or per turn with ppo.turn_advantages); false: the trajectory's rewards summed at its "
        "last token", False)
    turn_gamma: float = option(
        "reward.per_turn: the discount across turns (a group estimator's trajectory score is "
        "sum_k turn_gamma^k r_k; a turn's return r_k + turn_gamma x the next turn's)", 1.0)
    kl_ceiling: float | None = option(
        "stop the run when the KL per sequence exceeds this (reward-hacking guard)")
    fn_timeout_s: float = option(
        "reward_fn: a call that has not returned after this many seconds fails the run", 300.0)
    weights: list[float] | None = option(
        "reward_fn: one weight per function (YAML [1.0, 0.5] or 1.0,0.5; one function's: 2.0); a "
        "row's reward is the weighted sum of the functions that do not return None for it (None "
        "= all 1)")
    isolation: RewardIsolation = option(
        "reward_fn: process (each function in a worker process of its own, reused across "
        "iterations: a call past reward.fn_timeout_s is killed whatever it holds, its exit or "
        "crash fails the run, its chdir, environment and signal handlers stay its own; the "
        "function must be importable) | thread (in the trainer's process: no process start, "
        "callables of any kind, but RISKS: a function holding the GIL (a catastrophic regex, a C "
        "loop) is never stopped and blocks Ctrl-C, os._exit ends the run with its exit code, and "
        "a chdir moves the run's relative paths)", "process")

    def __post_init__(self):
        check_fields(self, "reward.")
        check(self.kl_coef >= 0, f"reward.kl_coef must be >= 0, got {self.kl_coef}")
        check(self.kl_target is None or self.kl_target > 0,
              f"reward.kl_target must be > 0 or null, got {self.kl_target}")
        # A KL per sequence is >= 0: a ceiling <= 0 would stop the run at its first iteration,
        # after the models loaded and a rollout ran.
        check(self.kl_ceiling is None or 0 < self.kl_ceiling < math.inf,
              f"reward.kl_ceiling must be a finite number > 0 or null (off), got "
              f"{self.kl_ceiling}")
        check(self.kl_horizon > 0, f"reward.kl_horizon must be > 0, got {self.kl_horizon}")
        check(0 <= self.turn_gamma <= 1,
              f"reward.turn_gamma must be in [0, 1], got {self.turn_gamma}")
        check(self.clip is None or self.clip > 0,
              f"reward.clip must be > 0 or None, got {self.clip}")
        check(0 < self.fn_timeout_s <= MAX_FN_TIMEOUT_S,
              f"reward.fn_timeout_s must be in (0, {MAX_FN_TIMEOUT_S:g}] seconds, "
              f"got {self.fn_timeout_s:g}")
        for weight in self.weights or ():
            check(math.isfinite(weight),
                  f"reward.weights must be finite numbers, got {self.weights}")


@dataclass
class LoopConfig(RunConfig):
    iterations: int = option("PPO iterations (rollout + update)", 100)
    frozen_offload: bool = option(
        "under torchrun: the reference's and the reward model's FSDP2 shards rest in "
        "pinned CPU memory; in their scoring forwards each unit is copied to the GPU "
        "(non-blocking, the next one prefetched) for its all-gather and freed after "
        "(FSDP2's CPUOffloadPolicy; a reward model that is the LoRA critic's trunk "
        "stays)", False)
    prefix_sharing: bool | str = option(
        "the scoring forwards (reward model, reference, old log-probs, values) and the update "
        "read a group's prompt once, followed by its answers, each answer attending to the prompt "
        "and itself (the prompt's gradient summed over its answers); token budgets count the "
        "prompt once; equal to reading every row whole up to rounding; the rollout.exact "
        "old-log-prob forward reads rows whole. auto: on wherever the layout runs (not at "
        "train.context_parallel > 1, whose shards read rows whole); true: on, refused in one line "
        "where it does not run; false: every row read whole", "auto")

    @property
    def shares_prefixes(self) -> bool:
        """train.prefix_sharing resolved: auto is on wherever the shared layout runs."""
        return (self.prefix_sharing is True
                or (self.prefix_sharing == "auto" and self.context_parallel == 1))

    def __post_init__(self):
        super().__post_init__()
        check(self.iterations >= 1, f"train.iterations must be >= 1, got {self.iterations}")
        check(self.prefix_sharing in (True, False, "auto"),
              f"train.prefix_sharing must be true, false or auto, got {self.prefix_sharing!r}")


@dataclass
class RLConfig(Loadable):
    """What every RL stage (PPO, GRPO, distillation) reads: the policy and its prompts, the reward,
    the rollout, the update, the optimizer and the loop. A stage's config composes these sections
    with its own (PPOConfig: the critic and PPO-ptx; DistillConfig: the teacher); the shared stage
    pieces (engine/stages/rollout) read them alone."""

    policy: str = option(
        "SFT policy: a Hugging Face model directory (also the frozen reference) (required)", "")
    reward_model: str | None = option(
        "reward model directory from `fusedrl rm` (or give reward_fn)")
    reward_fn: str | list[str] | None = option(
        "'module:function' (or 'path/file.py:function'), several comma-separated or a YAML "
        "list: reward functions called as TRL calls them (prompts=, completions=, "
        "completion_ids=, each column of the prompt rows) or fn(prompts, responses) texts -> "
        "list of floats (None: not applicable to a row); weighted by reward.weights "
        "(docs/rewards.md)")
    prompts_file: str = option(f"prompts, one per row (column data.prompt_column): {DATA_SOURCE} "
                               "(required; from Python a datasets.Dataset may be passed instead: "
                               "docs/python_api.md)", "")
    data: PromptDataConfig = option("reading the prompts", factory=PromptDataConfig)
    output_dir: str = option("run directory: config, metrics, checkpoints, final policy (required)",
                             "")
    seed: int = option("seed of the prompt order, sampling and torch RNG", 0)
    rollout: RolloutConfig = option("generation", factory=RolloutConfig)
    ppo: UpdateConfig = option("PPO update", factory=UpdateConfig)
    reward: RewardConfig = option("reward shaping and KL control", factory=RewardConfig)
    optim: OptimConfig = option("policy optimizer (the schedule steps once per iteration)",
                                factory=OptimConfig)
    train: LoopConfig = option("loop", factory=LoopConfig)
    sandbox: SandboxConfig = option("the sandbox of the model's code (code_tests, the python tool)",
                                    factory=SandboxConfig)
    moe: RouterLossConfig = option(
        "router losses of a mixture-of-experts policy, in the update's loss",
        factory=RouterLossConfig)
    lora: LoRAConfig = option(
        "low-rank adapters on the policy (lora.rank > 0: its weights stay frozen and the "
        "reference is the policy with its adapters off, no second copy)", factory=LoRAConfig)

    @property
    def microbatch_tokens(self) -> int | None:
        """ppo.tokens_per_microbatch resolved (None: micro-batches by ppo.microbatch_size); auto
        packs by tokens only where minibatch_size full-length rows pass AUTO_FORWARD_TOKENS."""
        p, longest = self.ppo, self.rollout.max_prompt_length + self.rollout.max_new_tokens
        if p.tokens_per_microbatch != "auto":
            return p.tokens_per_microbatch
        if p.microbatch_size is not None or p.minibatch_size * longest <= AUTO_FORWARD_TOKENS:
            return None
        return max(AUTO_FORWARD_TOKENS, longest)

    def reward_fns(self) -> list[str]:
        """reward_fn's specs: its list, or its comma-separated string cut ([] without one)."""
        if self.reward_fn is None:
            return []
        specs = self.reward_fn.split(",") if isinstance(self.reward_fn, str) else self.reward_fn
        return [spec.strip() for spec in specs]

    def paths(self) -> tuple[dict, dict]:
        """({option: model directory or None}, {option: input file or None}) the run reads (checked
        first; the first model's tokenizer is the run's)."""
        return ({"policy": self.policy, "reward_model": self.reward_model},
                {"prompts_file": self.prompts_file})

    def parallel_job(self) -> ParallelJob:
        """What the parallel layout and the plan read of this stage (config/parallel_job.py)."""
        return ParallelJob(self.train, self.lora.rank, self.policy,
                           persistent_weights=self.rollout.persistent_weights,
                           refuse_pairs=lambda moe: refuse_incompatible(self, moe=moe))

    def require_data(self) -> None:
        """ValueError unless the config names its prompts (a Python caller may pass a
        datasets.Dataset instead: then this is not called)."""
        check(bool(self.prompts_file), f"prompts_file is required ({DATA_SOURCE})")

    def require_model(self) -> None:
        """ValueError unless the config names its policy: checked when a run or a plan starts, not
        when the config is built, so a trainer object can take the model as `model=`."""
        check(bool(self.policy), "policy is required (the SFT model directory)")

    def __post_init__(self):
        check_fields(self)
        check(bool(self.output_dir), "output_dir is required")
        specs, weights = self.reward_fns(), self.reward.weights
        check(all(specs), f"reward_fn={self.reward_fn!r}: expected 'module:function' specs, "
                          "comma-separated (one is empty)")
        check(weights is None or not specs or len(weights) == len(specs),
              f"reward.weights has {len(weights or ())} weight(s) for {len(specs)} reward "
              f"function(s) (reward_fn={self.reward_fn!r}): give one per function")
        longest = self.rollout.max_prompt_length + self.rollout.max_new_tokens
        check(self.ppo.tokens_per_microbatch in (None, "auto")
              or self.ppo.tokens_per_microbatch >= longest,
              f"ppo.tokens_per_microbatch={self.ppo.tokens_per_microbatch} must hold one row: "
              "rollout."
              f"max_prompt_length + rollout.max_new_tokens = {longest} tokens")


@dataclass
class PPOConfig(RLConfig):
    """InstructGPT step 3: PPO of the SFT policy against a reward model (or a reward function)."""

    critic: Critic = option("separate (a value model initialized from the reward model) | shared "
                            "(a value head on the policy's trunk) | none (critic-free: a group "
                            "estimator)",
                            "separate")
    ptx_file: str | None = option("demonstrations (a data file, as SFT's) for the PPO-ptx loss "
                                  "(with ppo.ptx_coef > 0)")
    critic_lr: float | None = option("critic learning rate (default: optim.lr)")
    critic_lora: LoRAConfig = option(
        "low-rank adapters on the separate critic (critic_lora.rank > 0: the critic holds no "
        "decoder of its own: its adapters and value head run on the reward model's frozen one, "
        "which scores with them off; with reward_fn the critic starts from the policy instead and "
        "gets a frozen copy of the policy's weights). A section apart from `lora`: the critic's "
        "rank and targets are tuned apart from the policy's, either can be LoRA alone, and "
        "lora-only runs and their checkpoints keep their full critic", factory=LoRAConfig)

    def paths(self) -> tuple[dict, dict]:
        models, files = super().paths()
        return models, {**files, "ptx_file": self.ptx_file}

    def __post_init__(self):
        super().__post_init__()
        check(self.ppo.ptx_coef == 0 or bool(self.ptx_file), "ppo.ptx_coef > 0 needs ptx_file")
        check(self.critic_lr is None or self.critic_lr > 0,
              f"critic_lr must be > 0, got {self.critic_lr}")
        grouped = self.ppo.estimator not in CRITIC_ESTIMATORS
        check(grouped == (self.critic == "none"),
              f"ppo.estimator={self.ppo.estimator} "
              + ("is critic-free: set critic=none" if grouped
                 else "needs a critic: critic=separate or shared")
              + f" (got critic={self.critic})")
        check(not grouped or self.rollout.samples_per_prompt >= 2,
              f"ppo.estimator={self.ppo.estimator} compares each prompt's responses: "
              "rollout.samples_per_prompt "
              f"must be >= 2, got {self.rollout.samples_per_prompt}")
        check(not self.critic_lora.enabled or self.critic == "separate",
              "critic_lora.rank > 0 adapts the separate critic: set critic=separate (got "
              f"critic={self.critic}; "
              "the shared value head trains with the policy, under `lora`)")
        refuse_incompatible(self)
        refuse_ignored(rl_rules(self), self)


def _grpo_update() -> UpdateConfig:
    return UpdateConfig(estimator="grpo", kl_loss_coef=0.001, vf_coef=0.0, epochs=1,
                        agg="token-mean")


def _grpo_reward() -> RewardConfig:
    return RewardConfig(kl_coef=0.0)


@dataclass
class GRPOConfig(PPOConfig):
    """Critic-free RL (`fusedrl grpo`): the PPO stage's one code path with GRPO's defaults: no
    critic, group-relative advantages over each prompt's responses, the KL to the reference as a
    loss term."""

    critic: Critic = option("none: critic-free (the GRPO family needs no value model)", "none")
    rollout: RolloutConfig = option("generation",
                                    factory=lambda: RolloutConfig(samples_per_prompt=8))
    ppo: UpdateConfig = option("policy update", factory=_grpo_update)
    reward: RewardConfig = option("reward shaping (the KL is a loss term here: ppo.kl_loss_coef)",
                                  factory=_grpo_reward)
