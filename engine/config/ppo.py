"""Config of the PPO stage: plain dataclasses validated on construction, loadable from YAML with
`key=value` overrides (engine/config/io.py), usable from Python as a library. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .fields import check, check_choices, option
from .train import OptimConfig, RunConfig

Critic = Literal["separate", "shared"]
Estimator = Literal["gae", "reinforce"]
KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


@dataclass
class RolloutConfig:
    prompts_per_iteration: int = option("prompts sampled per PPO iteration", 16)
    samples_per_prompt: int = option("responses generated per prompt (they share the prompt's KV blocks)", 4)
    max_prompt_length: int = option("prompts keep their last this many tokens", 256)
    truncate_prompts: bool = option("cut a prompt that leaves no room to generate within the model's "
                                    "context to its last max_model_len - 1 tokens (counted) instead of "
                                    "failing on it", False)
    max_new_tokens: int = option("response length limit", 64)
    temperature: float = option("sampling temperature (> 0); log-probs are taken at the same temperature", 1.0)
    top_k: int = option("top-k filter of the sampler (0 = off)", 0)
    top_p: float = option("nucleus filter of the sampler (1.0 = off)", 1.0)
    ignore_eos: bool = option("sample past EOS up to max_new_tokens (fixed-length rollouts, for benchmarks)", False)
    kv_cache_memory: int = option("bytes of the paged KV pool, kept allocated through training", 1 << 28)
    block_size: int = option("tokens per KV block", 16)

    def __post_init__(self):
        for name in ("prompts_per_iteration", "samples_per_prompt", "max_prompt_length", "max_new_tokens",
                     "kv_cache_memory", "block_size"):
            check(getattr(self, name) >= 1, f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        check(self.temperature > 0, f"rollout.temperature must be > 0, got {self.temperature}")
        check(self.top_k >= 0 and 0 < self.top_p <= 1, "rollout.top_k must be >= 0 and rollout.top_p in (0, 1]")


@dataclass
class UpdateConfig:
    epochs: int = option("PPO epochs over each rollout", 4)
    minibatch_size: int = option("sequences per PPO minibatch update", 16)
    microbatch_size: int | None = option("sequences per forward/backward inside a minibatch; gradients are "
                                        "accumulated to the whole minibatch's (None = the minibatch at once)")
    clip_eps: float = option("ratio clip: [1 - clip_eps, 1 + clip_eps_high]", 0.2)
    clip_eps_high: float | None = option("upper ratio clip (default: clip_eps)")
    dual_clip: float | None = option("dual-clip bound c > 1 for negative advantages (None = off)")
    agg: Aggregation = option("loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum", "token-mean")
    vf_coef: float = option("weight of the value loss", 0.1)
    vf_clip: float | None = option("value clip around the rollout's values (None = off)", 0.2)
    ent_coef: float = option("weight of the entropy bonus", 0.0)
    ptx_coef: float = option("weight of the pretraining (PPO-ptx) loss on ptx_file", 0.0)
    estimator: Estimator = option("advantage estimator: gae | reinforce (REINFORCE with the critic as baseline)", "gae")
    gamma: float = option("discount", 1.0)
    lam: float = option("GAE lambda", 0.95)
    whiten_advantages: bool = option("normalize advantages over the rollout's valid tokens", True)
    max_approx_kl: float = option("stop the epochs early once a minibatch's approx KL passes this (0 = off)", 0.0)

    def __post_init__(self):
        check_choices(self, "ppo.")
        check(self.epochs >= 1 and self.minibatch_size >= 1, "ppo.epochs and ppo.minibatch_size must be >= 1")
        check(self.microbatch_size is None or self.microbatch_size >= 1,
               f"ppo.microbatch_size must be >= 1 or null, got {self.microbatch_size}")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        for name in ("vf_coef", "ent_coef", "ptx_coef", "max_approx_kl"):
            check(getattr(self, name) >= 0, f"ppo.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RewardConfig:
    kl_coef: float = option("initial coefficient beta of the per-token KL penalty", 0.05)
    kl_target: float | None = option("adaptive beta: target KL per sequence (None = fixed beta)")
    kl_horizon: int = option("adaptive beta: horizon in sequences of the proportional controller", 10000)
    kl_estimator: KLEstimator = option("per-token KL estimator in the reward: k1 | k2 | k3", "k1")
    normalize: bool = option("normalize scores by their running mean and std", False)
    clip: float | None = option("clip (normalized) scores to +-clip (None = off)")
    kl_ceiling: float | None = option("stop the run when the KL per sequence exceeds this (reward-hacking guard)")

    def __post_init__(self):
        check_choices(self, "reward.")
        check(self.kl_coef >= 0, f"reward.kl_coef must be >= 0, got {self.kl_coef}")
        check(self.clip is None or self.clip > 0, f"reward.clip must be > 0 or None, got {self.clip}")


@dataclass
class LoopConfig(RunConfig):
    iterations: int = option("PPO iterations (rollout + update)", 100)

    def __post_init__(self):
        super().__post_init__()
        check(self.iterations >= 1, f"train.iterations must be >= 1, got {self.iterations}")


@dataclass
class PPOConfig:
    """InstructGPT step 3: PPO of the SFT policy against a reward model (or a reward function)."""

    policy: str = option("SFT policy: a Hugging Face model directory (also the frozen reference) (required)", "")
    reward_model: str | None = option("reward model directory from `fusedrl rm` (or give reward_fn)")
    reward_fn: str | None = option("'module:function' scoring (prompts, responses) texts -> list of floats")
    critic: Critic = option("separate (a value model initialized from the reward model) | shared "
                        "(a value head on the policy's trunk)", "separate")
    prompts_file: str = option("JSONL of {\"prompt\": ...} lines (required)", "")
    ptx_file: str | None = option("JSONL demonstrations for the PPO-ptx loss (with ppo.ptx_coef > 0)")
    output_dir: str = option("run directory: config, metrics, checkpoints, final policy (required)", "")
    seed: int = option("seed of the prompt order, sampling and torch RNG", 0)
    rollout: RolloutConfig = option("generation", factory=RolloutConfig)
    ppo: UpdateConfig = option("PPO update", factory=UpdateConfig)
    reward: RewardConfig = option("reward shaping and KL control", factory=RewardConfig)
    optim: OptimConfig = option("policy optimizer (the schedule steps once per iteration)", factory=OptimConfig)
    critic_lr: float | None = option("critic learning rate (default: optim.lr)")
    train: LoopConfig = option("loop", factory=LoopConfig)

    def __post_init__(self):
        check_choices(self)
        check(bool(self.policy), "policy is required (the SFT model directory)")
        check(bool(self.prompts_file), "prompts_file is required")
        check(bool(self.output_dir), "output_dir is required")
        check(self.reward_model is None or self.reward_fn is None,
               "give one of reward_model and reward_fn, not both")
        check(self.ppo.ptx_coef == 0 or bool(self.ptx_file), "ppo.ptx_coef > 0 needs ptx_file")
        check(self.critic_lr is None or self.critic_lr > 0, f"critic_lr must be > 0, got {self.critic_lr}")
