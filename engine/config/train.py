"""Configs of the SFT and reward-model stages: plain dataclasses, validated on construction.

Use them from Python (`SFTConfig(model=..., output_dir=..., data=DataConfig(train_file=...))`) or
through `fusedrl sft|rm --config FILE key=value ...` (engine/config/io.py does the YAML part).
Enum-like options are `Literal` types: the YAML reader rejects any other value, naming the choices.
Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from .fields import check, check_fields, option
from .compatibility import refuse_ignored, refuse_incompatible, supervised_rules
from .io import Loadable
from .lora import LoRAConfig
from .moe import RouterLossConfig
from .parallel_job import ParallelJob

DataFormat = Literal["auto", "chat", "prompt_completion", "demonstration", "text", "pairwise",
                     "ranking", "hh", "implicit"]
SFT_FORMATS = ("auto", "chat", "prompt_completion", "demonstration", "text")
RM_FORMATS = ("auto", "pairwise", "ranking", "hh", "implicit")
TrainOn = Literal["assistant_turns", "last_turn"]
# Our column names, each readable from another column by data.<name>_column (data/sources.py).
COLUMNS = ("messages", "prompt", "completion", "response", "text", "chosen", "rejected")
DATA_SOURCE = ("a .jsonl, .json, .parquet or .csv file, or a directory written by datasets' "
               "save_to_disk (local files only)")


def _column(name: str):
    return option(f"the data's column read as {name!r}", name)
Precision = Literal["auto", "bf16-mixed", "fp32"]
DataParallel = Literal["shard", "replicate", "hybrid"]


@dataclass
class DataConfig:
    train_file: str = option(f"training data: {DATA_SOURCE} (required; from Python a "
                             "datasets.Dataset may be passed instead: docs/python_api.md)", "")
    eval_file: str | None = option("held-out data, as train_file; when unset, eval_fraction of "
                                   "train_file is held out")
    eval_fraction: float = option(
        "fraction of train_file held out for eval when eval_file is unset", 0.05)
    format: DataFormat = option("sft: auto|chat|prompt_completion|demonstration|text; rm: auto|"
                                "pairwise|ranking|hh|implicit (auto: decided per row by its "
                                "columns; docs/data_formats.md)", "auto")
    train_on: TrainOn = option("chat rows (messages): assistant_turns trains every assistant turn "
                               "(TRL's assistant_only_loss) | last_turn the last one only",
                               "assistant_turns")
    messages_column: str = _column("messages")
    prompt_column: str = _column("prompt")
    completion_column: str = _column("completion")
    response_column: str = _column("response")
    text_column: str = _column("text")
    chosen_column: str = _column("chosen")
    rejected_column: str = _column("rejected")
    max_length: int = option("max tokens of prompt + response; longer responses are cut at the end",
                             1024)
    max_prompt_length: int = option("prompts keep their last max_prompt_length tokens", 512)
    tokens_per_batch: int = option(
        "token budget of one packed micro-batch (all sequences together), per rank", 8192)
    tokens_per_microbatch: int | None = option(
        "token budget of one forward/backward, per rank: a step's examples (optim.grad_accum_steps "
        "micro-batches of tokens_per_batch) are packed in order into forwards of at most this many "
        "tokens, so each fills the device; the gradient stays the step's (null: one forward per "
        "micro-batch)")
    skip_malformed: bool = option("skip and count malformed rows instead of failing on the first",
                                  False)

    def columns(self) -> dict[str, str]:
        """{our column name: the data's} for the columns mapped to another name."""
        mapped = {name: getattr(self, f"{name}_column") for name in COLUMNS}
        return {ours: theirs for ours, theirs in mapped.items() if ours != theirs}

    def __post_init__(self):
        check_fields(self, "data.")
        for name in COLUMNS:
            check(bool(getattr(self, f"{name}_column")),
                  f"data.{name}_column must name a column, got ''")
        check(0 <= self.eval_fraction < 1,
              f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        check(0 < self.max_prompt_length < self.max_length,
               f"data.max_prompt_length must be in (0, max_length={self.max_length}), "
               f"got {self.max_prompt_length}")
        check(self.tokens_per_batch >= self.max_length,
               f"data.tokens_per_batch ({self.tokens_per_batch}) must hold one sequence of "
               f"data.max_length ({self.max_length})")
        check(self.tokens_per_microbatch is None or self.tokens_per_microbatch >= self.max_length,
               f"data.tokens_per_microbatch ({self.tokens_per_microbatch}) must be null or hold "
               "one sequence of "
               f"data.max_length ({self.max_length})")


@dataclass
class OptimConfig:
    lr: float = option("peak learning rate of AdamW", 1e-5)
    weight_decay: float = option("AdamW decoupled weight decay (not applied to norms and biases)",
                                 0.0)
    beta1: float = option("AdamW beta1", 0.9)
    beta2: float = option("AdamW beta2", 0.95)
    eps: float = option("AdamW epsilon", 1e-8)
    warmup_steps: int = option("linear warmup from 0 to lr over this many optimizer steps", 0)
    min_lr_ratio: float = option("cosine decay ends at lr * min_lr_ratio", 0.1)
    max_grad_norm: float = option("clip the global gradient norm to this (0 = no clipping)", 1.0)
    grad_accum_steps: int = option(
        "micro-batches per optimizer step on each rank (under torchrun the global batch is "
        "data.tokens_per_batch x grad_accum_steps x the number of ranks)", 1)

    def __post_init__(self):
        check(0 < self.lr < math.inf, f"optim.lr must be a finite number > 0, got {self.lr}")
        check(self.weight_decay >= 0,
              f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        for name in ("beta1", "beta2"):
            check(0 <= getattr(self, name) < 1,
                  f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1,
              f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.max_grad_norm >= 0,
              f"optim.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        check(self.grad_accum_steps >= 1,
              f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        check_fields(self, "optim.")


TRACKERS = ("tensorboard", "wandb", "mlflow", "none")


def _names(value) -> list[str]:
    """A list of names from a list, or from one comma-separated text (as given from Python)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


@dataclass
class RunConfig:
    """The loop options every stage shares (its `train` section); "step" is the stage's unit of
    progress (an optimizer step for SFT/RM, an iteration for PPO)."""
    # Frozen models to offload are the RL loop's (LoopConfig's option); every other stage's is off.
    frozen_offload: ClassVar[bool] = False
    device: str | None = option("cuda or cpu (default: cuda when available)")
    precision: Precision = option(
        "bf16-mixed (bf16 weights, fp32 master weights and moments in the optimizer) "
        "| fp32 | auto (bf16-mixed on CUDA, fp32 on CPU)", "auto")
    gradient_checkpointing: bool | str = option(
        "recompute each decoder layer in backward to save memory: true, false, or auto: on CUDA on "
        "where the run's memory plan (`fusedrl plan`) does not fit without it (or its KV pool "
        "holds less than one group of full-length answers), and with train.activation_offload; off "
        "on the CPU", "auto")
    train_vision: bool = option(
        "a vision-language model: train its vision tower (and patch merger) too; false: frozen, "
        "only the decoder trains (docs/vision.md)", False)
    activation_offload: bool = option(
        "with train.gradient_checkpointing: each layer's saved input and residual rest in (pinned) "
        "CPU memory from the forward to the backward, copied back one layer ahead (prefetched on "
        "CUDA); bit-identical results, activations of about one layer on the device", False)
    log_every: int = option("write a metrics line every this many steps", 1)
    save_every: int = option("checkpoint every this many steps (0 = by time and at the end only)",
                             0)
    save_every_minutes: float = option(
        "also checkpoint when this many minutes passed since the last "
        "checkpoint (0 = off), so a kill loses at most about this much work", 10.0)
    max_consecutive_skips: int = option(
        "stop the run when this many steps in a row could not update "
        "(non-finite loss or gradient, every PPO row dropped); 0 = never", 10)
    keep_checkpoints: int = option("keep only the newest this many checkpoints (0 = all)", 2)
    resume: bool = option("continue from the newest checkpoint in output_dir when there is one",
                          True)
    overwrite: bool = option(
        "replace an earlier run of fusedrl in output_dir (never a directory fusedrl did "
        "not make); without it train.resume=false over an earlier run is refused", False)
    resume_without_config: bool = option(
        "resume a run directory that has lost its config.yaml (it holds metrics.jsonl): the "
        "options its checkpoints were trained with are then not compared with this run's; refused "
        "without it", False)
    tensorboard: bool = option("also write TensorBoard events to output_dir/tensorboard (the same "
                               "as train.report_to=tensorboard)", False)
    report_to: list[str] = option("experiment trackers fed every metrics record: tensorboard | "
                                  "wandb | mlflow | none, several as a YAML list or "
                                  "comma-separated (wandb,mlflow); each through its own library: "
                                  "pip install 'fusedrl[NAME]'", factory=list)
    progress: bool = option("show progress on stderr: a live bar on a terminal, else (a log file) "
                            "one plain line per train.log_every steps, at most one each 30 s", True)
    data_parallel: DataParallel = option(
        "under torchrun: shard (FSDP2 full shard: weights, gradients, optimizer "
        "state 1/N per rank; at train.tensor_parallel > 1 the tensor slices sharded "
        "over the data groups) | replicate (whole copies, for small models; at "
        "train.tensor_parallel > 1 copies of the slices) | hybrid "
        "(HSDP: full shard within each group of train.shard_group_size ranks, one "
        "node's by default, whole copies across the groups: several nodes)", "shard")
    shard_group_size: int = option(
        "with train.data_parallel=hybrid: the ranks of one shard group, dividing the "
        "world size (0: one node's, torchrun's LOCAL_WORLD_SIZE)", 0)
    tensor_parallel: int = option(
        "under torchrun: T ranks (dividing the ranks and the model's key/value heads) "
        "each keep and train their tensor slices of the weights, data-parallel across the "
        "world_size / T groups (which shard or copy the slices: train.data_parallel; a "
        "LoRA base is copied; the offloads need sharded slices; not with rollout.exact "
        "yet)", 1)
    context_parallel: int = option(
        "under torchrun: C consecutive ranks share each packed forward's tokens (training "
        "and scoring), each running every layer on its 1/C of them, attention over keys and "
        "values all-gathered in the group (C dividing the ranks; train.data_parallel=shard "
        "over the world / C data ranks; with train.tensor_parallel=T, C x T consecutive "
        "ranks; SFT, PPO (its critic too) and GRPO, LoRA included; not with expert "
        "parallelism, LoRA beside tensor slices or prefix sharing yet)", 1)
    expert_parallel: int = option(
        "under torchrun, for an MoE model: the experts of every MoE layer sharded over "
        "groups of E consecutive ranks (E dividing the world size and the number of "
        "experts), each rank keeping and training its share whole, tokens sent to them by "
        "all-to-all within the group, the world / E groups' gradients averaged; FSDP "
        "shards the rest over every rank; SFT, PPO and GRPO (the policy; its rollouts "
        "gather the experts) for now", 1)
    expert_capacity_factor: float = option(
        "with train.expert_parallel > 1: > 0 sends each rank of the expert group a fixed buffer "
        "of ceil(factor x tokens x top_k / E) rows (tokens: the group's largest forward), no host "
        "read per layer; a buffer's rows past it are dropped (their expert output zero, counted "
        "as expert_dropped); factor >= E drops none; 0: exact variable splits, one host read "
        "per MoE layer", 0.0)
    dist_timeout_s: float = option(
        "under torchrun: seconds a collective waits for the other ranks before "
        "the job fails", 600.0)
    optimizer_offload: bool = option(
        "under torchrun: the trained models' sharded parameters, gradients and "
        "optimizer state (fp32 masters, AdamW moments) rest in CPU memory, the "
        "optimizer steps on the CPU (FSDP2's CPUOffloadPolicy; LoRA adapters, "
        "not sharded, stay on the device)", False)
    memory_check: bool = option(
        "on CUDA, refuse at start a run whose memory plan (`fusedrl plan`) does not fit "
        "the GPUs", True)

    def checkpointing(self) -> bool:
        """gradient_checkpointing as a model takes it. A run's start resolves auto by its memory
        plan (engine/plan/check.py:startup_check); auto still unresolved here (a model built
        outside a run) is on only with activation_offload."""
        if self.gradient_checkpointing == "auto":
            return self.activation_offload
        return self.gradient_checkpointing

    def __post_init__(self):
        check_fields(self, "train.")
        check(self.gradient_checkpointing in (True, False, "auto"),
              "train.gradient_checkpointing must be true, false or auto, got "
              f"{self.gradient_checkpointing!r}")
        check(not self.activation_offload or self.gradient_checkpointing is not False,
              "train.activation_offload=true moves what checkpointed layers keep: set "
              "train.gradient_checkpointing=true (or auto)")
        check(self.tensor_parallel >= 1,
              f"train.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        check(self.shard_group_size >= 0,
              f"train.shard_group_size must be >= 0, got {self.shard_group_size}")
        check(self.shard_group_size == 0 or self.data_parallel == "hybrid",
              f"train.shard_group_size={self.shard_group_size} is read with "
              "train.data_parallel=hybrid only, got "
              f"train.data_parallel={self.data_parallel}")
        check(self.expert_parallel >= 1,
              f"train.expert_parallel must be >= 1, got {self.expert_parallel}")
        check(0 <= self.expert_capacity_factor < math.inf,
              "train.expert_capacity_factor must be a finite number >= 0, got "
              f"{self.expert_capacity_factor}")
        check(self.context_parallel >= 1,
              f"train.context_parallel must be >= 1, got {self.context_parallel}")
        check(self.dist_timeout_s > 0,
              f"train.dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        check(self.device in (None, "cpu", "cuda") or self.device.startswith("cuda:"),
               f"train.device must be cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("save_every", "keep_checkpoints", "max_consecutive_skips"):
            check(getattr(self, name) >= 0,
                  f"train.{name} must be >= 0, got {getattr(self, name)}")
        check(0 <= self.save_every_minutes < math.inf,
              "train.save_every_minutes must be a finite number >= 0, got "
              f"{self.save_every_minutes}")
        check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        self.report_to = _names(self.report_to)
        unknown = [n for n in self.report_to if n not in TRACKERS]
        check(not unknown, f"train.report_to: {unknown[0] if unknown else ''!r} is not a tracker; "
                           f"expected {' | '.join(TRACKERS)} (several as a list)")
        check("none" not in self.report_to or self.report_to == ["none"],
              f"train.report_to={','.join(self.report_to)}: 'none' cannot be listed with trackers")


@dataclass
class TrainConfig(RunConfig):
    epochs: int = option("passes over the training data", 1)
    max_steps: int | None = option("stop after this many optimizer steps (overrides epochs)")
    eval_every: int = option("evaluate every this many steps (0 = only at the end)", 0)
    cuda_graphs: bool = option(
        "replay each training forward (the forward, the loss and the backward) from a CUDA "
        "graph, one per bucket of sequence counts, captured at its first use: one host call a "
        "forward instead of hundreds of launches; one GPU, a dense text model, without "
        "gradient checkpointing or LoRA for now (docs/training.md)", False)

    def __post_init__(self):
        super().__post_init__()
        check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        check(self.max_steps is None or self.max_steps >= 1,
              f"train.max_steps must be >= 1, got {self.max_steps}")
        check(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")


@dataclass
class StageConfig(Loadable):
    """What every training stage shares."""

    model: str = option("Hugging Face model directory to start from (required)", "")
    output_dir: str = option("run directory: config, metrics, checkpoints, final model (required)",
                             "")
    seed: int = option("seed of the data order, the split and the torch RNG", 0)
    data: DataConfig = option("data", factory=DataConfig)
    optim: OptimConfig = option("optimizer", factory=OptimConfig)
    train: TrainConfig = option("loop", factory=TrainConfig)

    def paths(self) -> tuple[dict, dict]:
        """({option: model directory}, {option: input file or None}) the run reads (checked
        first)."""
        return {"model": self.model}, {"data.train_file": self.data.train_file,
                                       "data.eval_file": self.data.eval_file}

    def require_data(self) -> None:
        """ValueError unless the config names its training data (a Python caller may pass a
        datasets.Dataset instead: then this is not called)."""
        check(bool(self.data.train_file), f"data.train_file is required ({DATA_SOURCE})")

    def parallel_job(self) -> ParallelJob:
        """What the parallel layout and the plan read of this stage (config/parallel_job.py): its
        model trains expert- and context-parallel (RMConfig's: neither)."""
        return ParallelJob(self.train, self.lora.rank, self.model,
                           persistent_weights=False,
                           refuse_pairs=lambda moe: refuse_incompatible(self, moe=moe))

    def require_model(self) -> None:
        """ValueError unless the config names its model: checked when a run or a plan starts, not
        when the config is built, so a trainer object can take the model as `model=`."""
        check(bool(self.model), "model is required (a Hugging Face model directory)")

    def __post_init__(self):
        check_fields(self)
        check(bool(self.output_dir), "output_dir is required")


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning on demonstrations; loss on response tokens only."""

    lora: LoRAConfig = option("low-rank adapters (lora.rank > 0: the weights stay frozen)",
                              factory=LoRAConfig)
    moe: RouterLossConfig = option("router losses of mixture-of-experts models",
                                   factory=RouterLossConfig)

    def __post_init__(self):
        super().__post_init__()
        check(self.data.format in SFT_FORMATS,
               f"data.format for sft must be one of {SFT_FORMATS}, got {self.data.format!r}")
        refuse_incompatible(self)
        refuse_ignored(supervised_rules(self), self)


@dataclass
class RMConfig(StageConfig):
    """Reward model on pairwise or K-way preferences."""

    beta_rm: float = option("weight of the LM loss (per-token NLL) on the chosen response; 0 = off",
                            0.0)
    reference_file: str | None = option(
        "demonstrations (a data file, as data.train_file) whose responses define reward 0 (the "
        "normalization offset); "
        "default: the best response of each training example")
    max_reference: int = option("at most this many reference responses for the offset", 1024)
    lora: LoRAConfig = option(
        "low-rank adapters (lora.rank > 0: the decoder stays frozen, the adapters and the "
        "score head train; exported as a PEFT SEQ_CLS adapter and merged)", factory=LoRAConfig)

    def paths(self) -> tuple[dict, dict]:
        models, files = super().paths()
        return models, {**files, "reference_file": self.reference_file}

    def parallel_job(self) -> ParallelJob:
        """StageConfig's, with no model trained expert- or context-parallel."""
        return dataclasses.replace(super().parallel_job(), trained_model=None)

    def __post_init__(self):
        super().__post_init__()
        check(self.data.format in RM_FORMATS,
               f"data.format for rm must be one of {RM_FORMATS}, got {self.data.format!r}")
        check(self.beta_rm >= 0, f"beta_rm must be >= 0, got {self.beta_rm}")
        check(self.max_reference >= 1, f"max_reference must be >= 1, got {self.max_reference}")
        refuse_incompatible(self)
        refuse_ignored(supervised_rules(self), self)
