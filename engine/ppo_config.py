"""Config of the PPO stage: plain dataclasses validated on construction, loadable from YAML with
`key=value` overrides (engine/config_io.py), usable from Python as a library."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.critic import CRITICS
from engine.train_config import OptimConfig, RunConfig, _check, _help

ESTIMATORS = ("gae", "reinforce")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class RolloutConfig:
    prompts_per_iteration: int = _help("prompts sampled per PPO iteration", 16)
    samples_per_prompt: int = _help("responses generated per prompt (they share the prompt's KV blocks)", 4)
    max_prompt_length: int = _help("prompts keep their last this many tokens", 256)
    max_new_tokens: int = _help("response length limit", 64)
    temperature: float = _help("sampling temperature (> 0); log-probs are taken at the same temperature", 1.0)
    top_k: int = _help("top-k filter of the sampler (0 = off)", 0)
    top_p: float = _help("nucleus filter of the sampler (1.0 = off)", 1.0)
    ignore_eos: bool = _help("sample past EOS up to max_new_tokens (fixed-length rollouts, for benchmarks)", False)
    kv_cache_memory: int = _help("bytes of the paged KV pool, kept allocated through training", 1 << 28)
    block_size: int = _help("tokens per KV block", 16)

    def __post_init__(self):
        for name in ("prompts_per_iteration", "samples_per_prompt", "max_prompt_length", "max_new_tokens",
                     "kv_cache_memory", "block_size"):
            _check(getattr(self, name) >= 1, f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.temperature > 0, f"rollout.temperature must be > 0, got {self.temperature}")
        _check(self.top_k >= 0 and 0 < self.top_p <= 1, "rollout.top_k must be >= 0 and rollout.top_p in (0, 1]")


@dataclass
class LossConfig:
    epochs: int = _help("PPO epochs over each rollout", 4)
    minibatch_size: int = _help("sequences per PPO minibatch update", 16)
    microbatch_size: int | None = _help("sequences per forward/backward inside a minibatch; gradients are "
                                        "accumulated to the whole minibatch's (None = the minibatch at once)")
    clip_eps: float = _help("ratio clip: [1 - clip_eps, 1 + clip_eps_high]", 0.2)
    clip_eps_high: float | None = _help("upper ratio clip (default: clip_eps)")
    dual_clip: float | None = _help("dual-clip bound c > 1 for negative advantages (None = off)")
    agg: str = _help("loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum", "token-mean")
    vf_coef: float = _help("weight of the value loss", 0.1)
    vf_clip: float | None = _help("value clip around the rollout's values (None = off)", 0.2)
    ent_coef: float = _help("weight of the entropy bonus", 0.0)
    ptx_coef: float = _help("weight of the pretraining (PPO-ptx) loss on ptx_file", 0.0)
    estimator: str = _help("advantage estimator: gae | reinforce (REINFORCE with the critic as baseline)", "gae")
    gamma: float = _help("discount", 1.0)
    lam: float = _help("GAE lambda", 0.95)
    whiten_advantages: bool = _help("normalize advantages over the rollout's valid tokens", True)
    max_approx_kl: float = _help("stop the epochs early once a minibatch's approx KL passes this (0 = off)", 0.0)

    def __post_init__(self):
        _check(self.epochs >= 1 and self.minibatch_size >= 1, "ppo.epochs and ppo.minibatch_size must be >= 1")
        _check(self.microbatch_size is None or self.microbatch_size >= 1,
               f"ppo.microbatch_size must be >= 1 or null, got {self.microbatch_size}")
        _check(self.estimator in ESTIMATORS, f"ppo.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        for name in ("vf_coef", "ent_coef", "ptx_coef", "max_approx_kl"):
            _check(getattr(self, name) >= 0, f"ppo.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RewardConfig:
    kl_coef: float = _help("initial coefficient beta of the per-token KL penalty", 0.05)
    kl_target: float | None = _help("adaptive beta: target KL per sequence (None = fixed beta)")
    kl_horizon: int = _help("adaptive beta: horizon in sequences of the proportional controller", 10000)
    kl_estimator: str = _help("per-token KL estimator in the reward: k1 | k2 | k3", "k1")
    normalize: bool = _help("normalize scores by their running mean and std", False)
    clip: float | None = _help("clip (normalized) scores to +-clip (None = off)")
    kl_ceiling: float | None = _help("stop the run when the KL per sequence exceeds this (reward-hacking guard)")

    def __post_init__(self):
        _check(self.kl_coef >= 0, f"reward.kl_coef must be >= 0, got {self.kl_coef}")
        _check(self.kl_estimator in KL_ESTIMATORS,
               f"reward.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        _check(self.clip is None or self.clip > 0, f"reward.clip must be > 0 or None, got {self.clip}")


@dataclass
class LoopConfig(RunConfig):
    iterations: int = _help("PPO iterations (rollout + update)", 100)

    def __post_init__(self):
        super().__post_init__()
        _check(self.iterations >= 1, f"train.iterations must be >= 1, got {self.iterations}")


@dataclass
class PPOConfig:
    """InstructGPT step 3: PPO of the SFT policy against a reward model (or a reward function)."""

    policy: str = _help("SFT policy: a Hugging Face model directory (also the frozen reference) (required)", "")
    reward_model: str | None = _help("reward model directory from `fusedrl rm` (or give reward_fn)")
    reward_fn: str | None = _help("'module:function' scoring (prompts, responses) texts -> list of floats")
    critic: str = _help("separate (a value model initialized from the reward model) | shared "
                        "(a value head on the policy's trunk)", "separate")
    prompts_file: str = _help("JSONL of {\"prompt\": ...} lines (required)", "")
    ptx_file: str | None = _help("JSONL demonstrations for the PPO-ptx loss (with ppo.ptx_coef > 0)")
    output_dir: str = _help("run directory: config, metrics, checkpoints, final policy (required)", "")
    seed: int = _help("seed of the prompt order, sampling and torch RNG", 0)
    rollout: RolloutConfig = _help("generation", factory=RolloutConfig)
    ppo: LossConfig = _help("PPO update", factory=LossConfig)
    reward: RewardConfig = _help("reward shaping and KL control", factory=RewardConfig)
    optim: OptimConfig = _help("policy optimizer (the schedule steps once per iteration)", factory=OptimConfig)
    critic_lr: float | None = _help("critic learning rate (default: optim.lr)")
    train: LoopConfig = _help("loop", factory=LoopConfig)

    def __post_init__(self):
        _check(bool(self.policy), "policy is required (the SFT model directory)")
        _check(bool(self.prompts_file), "prompts_file is required")
        _check(bool(self.output_dir), "output_dir is required")
        _check(self.reward_model is None or self.reward_fn is None,
               "give one of reward_model and reward_fn, not both")
        _check(self.critic in CRITICS, f"critic must be one of {CRITICS}, got {self.critic!r}")
        _check(self.ppo.ptx_coef == 0 or bool(self.ptx_file), "ppo.ptx_coef > 0 needs ptx_file")
        _check(self.critic_lr is None or self.critic_lr > 0, f"critic_lr must be > 0, got {self.critic_lr}")
