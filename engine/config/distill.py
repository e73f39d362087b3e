"""Config of the on-policy distillation stage (`fusedrl distill`): the sections every RL stage reads
(RLConfig: the policy, which is the student, its prompts, reward, rollout, update, optimizer, loop,
LoRA) plus the frozen teacher and the `distill` section; no critic, no PPO-ptx. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from .estimators import CRITIC_ESTIMATORS
from .compatibility import distill_rules, refuse_ignored, refuse_incompatible, rl_rules
from .fields import check, check_fields, option
from .lora import LoRAConfig
from .ppo import RewardConfig, RLConfig, UpdateConfig
from .rollout import MIN_TEMPERATURE, RolloutConfig

DistillMode = Literal["full", "sampled", "top_k"]


@dataclass
class DistillSection:
    beta: float = option(
        "TRL's generalized JSD weight: 0 = forward KL(teacher || student), 1 = reverse "
        "KL(student || teacher) (on-policy distillation's), in between the JSD with mixture "
        "(1 - beta) p_student + beta p_teacher", 1.0)
    temperature: float = option("temperature of both distributions in the divergence", 1.0)
    mode: DistillMode = option(
        "full: the divergence over the whole vocabulary at every sampled position (both heads "
        "fused, no [tokens, vocabulary] logits) | sampled: the reverse KL on the sampled token "
        "only, log p_teacher - log p_student as a per-token advantage (Thinking Machines' "
        "recipe) | top_k: the divergence over the teacher's top_k tokens plus its tail mass "
        "(verl's)", "full")
    top_k: int = option("mode=top_k: the teacher's tokens kept per position", 20)
    reward_coef: float = option(
        "weight of the reward's group advantage added to the teacher's signal (Qwen3's recipe; "
        "needs reward_fn or reward_model; 0 = the teacher alone, no reward is called)", 0.0)
    lmbda: float = option(
        "GKD's mixing: the fraction of iterations that distill on the student's own samples; the "
        "others on the dataset's completions (prompts_file's `completion` column, TRL's "
        "prompt-completion format)", 1.0)

    def __post_init__(self):
        check_fields(self, "distill.")
        check(0 <= self.beta <= 1, f"distill.beta must be in [0, 1], got {self.beta}")
        check(MIN_TEMPERATURE <= self.temperature < math.inf,
              f"distill.temperature must be a finite number >= {MIN_TEMPERATURE:g}, got "
              f"{self.temperature}")
        check(self.top_k >= 1, f"distill.top_k must be >= 1, got {self.top_k}")
        check(self.reward_coef >= 0, f"distill.reward_coef must be >= 0, got {self.reward_coef}")
        check(0 <= self.lmbda <= 1, f"distill.lmbda must be in [0, 1], got {self.lmbda}")


def _distill_update() -> UpdateConfig:
    # One pass over on-policy samples; no reference model, so no KL term to it.
    return UpdateConfig(estimator="grpo", kl_loss_coef=0.0, vf_coef=0.0, epochs=1,
                        agg="token-mean")


@dataclass
class DistillConfig(RLConfig):
    """On-policy distillation (`fusedrl distill`): the student (`policy`) samples from its one
    weight copy, a frozen teacher of the same vocabulary scores every sampled token in the
    trainer's own process, and the student minimizes the per-token divergence to it."""

    teacher: str = option(
        "teacher: a Hugging Face model directory sharing the student's vocabulary, frozen and "
        "laid out like a reference model (required)", "")
    policy: str = option("the student: a Hugging Face model directory (required)", "")
    distill: DistillSection = option("the divergence", factory=DistillSection)
    rollout: RolloutConfig = option("generation",
                                    factory=lambda: RolloutConfig(samples_per_prompt=4))
    ppo: UpdateConfig = option(
        "the update (epochs, minibatch_size, microbatch_size, tokens_per_microbatch; estimator: "
        "the reward's group advantage with distill.reward_coef > 0)", factory=_distill_update)
    reward: RewardConfig = option("the reward functions' settings (with distill.reward_coef > 0)",
                                  factory=lambda: RewardConfig(kl_coef=0.0))
    # What the shared stage pieces read of an RL run, fixed here (not options): no critic, no
    # PPO-ptx.
    critic: ClassVar[str] = "none"
    critic_lr: ClassVar[None] = None
    critic_lora: ClassVar[LoRAConfig] = LoRAConfig()
    ptx_file: ClassVar[None] = None

    def paths(self) -> tuple[dict, dict]:
        models, files = super().paths()
        return {**models, "teacher": self.teacher}, files

    def require_model(self) -> None:
        super().require_model()
        check(bool(self.teacher), "teacher is required (the teacher's model directory)")

    def __post_init__(self):
        super().__post_init__()
        check(self.ppo.estimator not in CRITIC_ESTIMATORS,
              f"ppo.estimator={self.ppo.estimator} needs a critic: distill has none (a group "
              "estimator weighs the reward with distill.reward_coef > 0)")
        check(self.rollout.samples_per_prompt >= 2,
              f"ppo.estimator={self.ppo.estimator} compares each prompt's responses: "
              "rollout.samples_per_prompt "
              f"must be >= 2, got {self.rollout.samples_per_prompt}")
        # The teacher replaces the reference: none is loaded, so no KL to it can be taken.
        check(self.ppo.kl_loss_coef == 0 and self.reward.kl_coef == 0,
              "distill loads no reference model (the teacher is the anchor): ppo.kl_loss_coef and "
              f"reward.kl_coef must be 0, got {self.ppo.kl_loss_coef} and {self.reward.kl_coef}")
        # (distill.reward_coef > 0 without a reward is refused when the run opens its rewards: a
        # Python caller may pass reward_fn= to train_distill)
        refuse_incompatible(self)
        refuse_ignored(rl_rules(self) + distill_rules(self), self)
        check(self.distill.mode != "sampled"
              or self.distill.temperature == self.rollout.temperature,
              "distill.mode=sampled compares the teacher's log-probs with the sampler's: "
              f"distill.temperature ({self.distill.temperature}) must equal rollout.temperature "
              f"({self.rollout.temperature})")
        check(self.distill.mode != "sampled" or self.distill.lmbda == 1,
              "distill.mode=sampled is a policy gradient on the student's own samples: "
              f"distill.lmbda must be 1, got {self.distill.lmbda}")


def check_teacher_vocabulary(student_vocab: int, teacher_vocab: int, teacher: str) -> None:
    """ValueError unless the teacher's vocabulary is the student's (the divergence compares the two
    distributions token by token)."""
    check(student_vocab == teacher_vocab,
          f"teacher={teacher}: its vocabulary has {teacher_vocab} tokens, the student's (policy) "
          f"{student_vocab}; distillation needs one vocabulary")
