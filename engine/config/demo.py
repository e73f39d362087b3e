"""Config of `fusedrl demo` (engine/demos/sorting.py): the task's size and each stage's length.
Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .fields import check, check_fields, option
from .train import Precision


# The default task's output directory; every other task's is this name, a dash and the task's.
DEMO_DIR = "fusedrl-demo"

TASKS = ("sort", "tool", "distill", "vision")
# The options whose default depends on the task (None: this default), one per TASKS.
TASK_DEFAULTS = {"digits": (4, 3, 4, 4), "sft_epochs": (4, 8, 4, 8),
                 "algo": ("ppo", "grpo", "grpo", "grpo"), "rl_iterations": (100, 30, 45, 60),
                 "train_prompts": (2000, 2000, 2000, 600)}


@dataclass
class DemoConfig:
    task: Literal["sort", "tool", "distill", "vision"] = option(
        "sort: single-turn, sort the prompt's digits; tool: multi-turn, add two numbers by calling "
        "an add tool (SFT on tool-call conversations, then GRPO with the tool); distill: a teacher "
        "trained to sort distilled on-policy into a smaller, weaker student, beside GRPO of the "
        "same budget from the same start; vision: a tiny vision-language model counts coloured "
        "squares in pictures drawn in code (SFT on noisy answers, then GRPO with the program's "
        "check)",
        "sort")
    output_dir: str | None = option(
        "where the runs, table and plot go (default: fusedrl-demo for task=sort, "
        "fusedrl-demo-TASK for each other task, so every task's run keeps its own)")
    seed: int = option("seed of the data, the model init and every stage", 0)
    digits: int | None = option(
        "digits per prompt (sort) or per number (tool) (default: sort 4, tool 3)")
    train_prompts: int | None = option(
        "prompts for SFT, RM and PPO (default: 2000; vision 600 pictures)")
    eval_prompts: int = option("held-out prompts for the accuracy", 100)
    demo_noise: float = option(
        "task=sort and vision: fraction of SFT demonstrations that are wrong", 0.4)
    tool_calls: float = option(
        "task=tool: fraction of SFT demonstrations that call the tool (the others "
        "answer at once)", 0.5)
    sft_epochs: int | None = option(
        "SFT epochs (task=distill: the teacher's; the student's is 1) (default: sort 4, tool 8, "
        "distill 4, vision 8)")
    rm_epochs: int = option("reward-model epochs", 3)
    algo: Literal["ppo", "grpo"] | None = option(
        "ppo: SFT -> reward model -> PPO; grpo: SFT -> GRPO with the program's check as the reward "
        "(default: sort ppo, tool grpo, its only one)")
    rl_iterations: int | None = option(
        "PPO or GRPO iterations (task=distill: distillation's and GRPO's each) (default: sort "
        "100, tool 30, distill 45, vision 60)")
    rl_prompts: int = option("prompts per iteration (PPO samples 4 responses each, GRPO 8)", 16)
    eval_samples: int = option("samples per held-out prompt for the accuracy", 4)
    lora_rank: int = option(
        "0: the RL stage trains every weight of the policy; r > 0: it trains rank-r LoRA "
        "adapters on every projection (alpha 2r) and the reference is the adapters switched off",
        0)
    arch: Literal["llama", "qwen3_moe"] = option(
        "the tiny base model: llama (dense MLP 192) | qwen3_moe (8 experts of 96, top-2: the same "
        "active MLP width; lora_rank > 0 then adapts attention only)", "llama")
    precision: Precision = option(
        "every stage's train.precision: auto (bf16-mixed on CUDA, fp32 on CPU) | "
        "bf16-mixed | fp32", "auto")
    overwrite: bool = option("replace an existing output_dir", False)

    def __post_init__(self):
        for name, defaults in TASK_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, defaults[TASKS.index(self.task)]
                        if self.task in TASKS else defaults[0])
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.task)
        check_fields(self)
        check(self.task == "sort" or self.algo == "grpo",
              f"algo must be grpo with task={self.task} (its reward is the program's), got "
              f"{self.algo!r}")
        check(self.task != "distill" or self.lora_rank == 0,
              f"lora_rank={self.lora_rank} with task=distill: its student trains every weight "
              "(fusedrl distill takes lora.rank for LoRA students)")
        check(0 <= self.tool_calls <= 1, f"tool_calls must be in [0, 1], got {self.tool_calls}")
        check(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        check(2 <= self.digits <= 8, f"digits must be in [2, 8], got {self.digits}")
        check(0 <= self.demo_noise < 1, f"demo_noise must be in [0, 1), got {self.demo_noise}")
        for name in ("train_prompts", "eval_prompts", "sft_epochs", "rm_epochs", "rl_iterations",
                     "rl_prompts",
                     "eval_samples"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")


def default_output_dir(task: str) -> str:
    """Where `fusedrl demo task=TASK` writes unless told: DEMO_DIR for the default task (sort),
    DEMO_DIR-TASK for each other one, so the demos run one after another without overwrite=true."""
    default_task = DemoConfig.__dataclass_fields__["task"].default
    return DEMO_DIR if task == default_task else f"{DEMO_DIR}-{task}"
