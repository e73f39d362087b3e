"""The parallel options checked against the job: the number of GPUs and the models' shapes.

A pair of options refused whatever the GPUs (context parallelism beside a critic, expert
parallelism beside LoRA, tensor slices beside rollout.exact, ...) is a row of the one table,
engine/config/compatibility.py: every config checks it when built, and `validate` again. What is
here depends on what a config alone does not say: the number of ranks (an offload in one process, a
size dividing the ranks, slices copied or sharded over the data groups, a shard group dividing the
ranks) or the model (a dense model given experts to shard, an MoE model beside context groups).

`validate(job, gpus)` checks a stage's ParallelJob (engine/config/parallel_job.py: what its
config says of the layout; no stage section is read here) on `gpus` ranks before anything loads:
what each stage runs first (through the plan's start-up check, engine/plan/check.py), and what
`fusedrl plan` checks before planning. The checks the layout or generation runs on what it is
given (the tensor size against a model's heads, persistent weights where nothing is gathered, the
batch-invariant rollout beside tensor slices) are the functions below it, called where those facts
are known.
"""
from __future__ import annotations

from ..config.parallel_job import ParallelJob
from ..errors import ConfigValueError, UsageError
from ..model.config import ModelConfig
from .dims import shard_group_size


def validate(job: ParallelJob, gpus: int, gpus_per_node: int | None = None) -> None:
    """UsageError (exit 2) when a stage's `job` combines options the engine does not run on
    `gpus` ranks: a pair of the compatibility table (refuse_incompatible; its mixture-of-experts
    pairs where the model's config is read for expert or context parallelism),
    train.optimizer_offload or train.frozen_offload in one process (they are FSDP2's CPU offload of
    sharded state), train.optimizer_offload beside copied tensor slices, train.tensor_parallel > 1
    beside frozen offload of copied slices (tensor_parallel_gaps), train.expert_parallel or
    train.context_parallel sizes the ranks or the model do not take (refuse_expert_parallel,
    refuse_context_parallel), rollout.persistent_weights where nothing is gathered (one process,
    tensor slices copied), and train.data_parallel=hybrid with a shard group that does not divide
    the ranks (ConfigValueError; a node holds `gpus_per_node` of them, default torchrun's
    LOCAL_WORLD_SIZE)."""
    train, t = job.train, job.train.tensor_parallel
    job.refuse_pairs(None)  # a config changed in place since it was built
    if train.optimizer_offload and gpus == 1:
        raise UsageError(
            "train.optimizer_offload=true offloads FSDP2's sharded parameters, gradients and "
            "optimizer state: run under torchrun (one process keeps them on its device)")
    if job.train.frozen_offload and gpus == 1:
        raise UsageError(
            "train.frozen_offload=true offloads the frozen models' FSDP2 shards: run under "
            "torchrun (one process keeps them on its device)")
    if train.optimizer_offload and t > 1 and not slices_sharded(job, gpus):
        raise UsageError(
            f"train.optimizer_offload=true with train.tensor_parallel={t} on {gpus} GPUs at "
            f"train.data_parallel={train.data_parallel}: expected tensor slices sharded over the "
            "data groups (train.data_parallel=shard, more GPUs than T) (copied slices are not "
            "offloaded)")
    if t > 1 and (unsupported := tensor_parallel_gaps(job, gpus)):
        raise UsageError(
            f"train.tensor_parallel={t} with {', '.join(unsupported)}: not supported "
            "tensor-parallel (SFT, RM, PPO and GRPO train tensor-parallel, LoRA included)")
    refuse_expert_parallel(job, gpus)
    refuse_context_parallel(job, gpus)
    copies = t > 1 and not slices_sharded(job, gpus)  # slices read where they lie
    if job.persistent_weights and (gpus == 1 or copies):
        where = ("one process" if gpus == 1 else
                 f"train.tensor_parallel={t} on {gpus} GPUs at train.data_parallel="
                 f"{train.data_parallel}{' with lora' if job.lora_rank > 0 else ''}")
        raise UsageError(
            f"rollout.persistent_weights=true keeps a gathered copy of the policy's FSDP2 shards: "
            "expected torchrun at train.tensor_parallel=1, or tensor slices sharded over the data "
            "groups "
            f"(got {where}, which gathers nothing)")
    # train.data_parallel=hybrid: a shard group (one node's ranks unless train.shard_group_size)
    # dividing the ranks.
    shard_group_size(train.data_parallel, gpus, train.shard_group_size, gpus_per_node)


def check_models(train, world: int, configs: dict) -> None:
    """The stage's models (`configs`: {option: ModelConfig}) against train.tensor_parallel on
    `world` ranks (check_tensor_parallel): each of them is laid out over the tensor ranks."""
    if train.tensor_parallel > 1:
        for config in configs.values():
            check_tensor_parallel(train.tensor_parallel, world, config)


def slices_sharded(job: ParallelJob, gpus: int) -> bool:
    """Whether FSDP2 shards the trained models' tensor slices over the data groups
    (engine/parallel/tensor_parallel.py): train.data_parallel=shard on more GPUs than
    train.tensor_parallel, no LoRA base."""
    return (job.train.data_parallel ==
            "shard" and gpus > job.train.tensor_parallel and job.lora_rank == 0)


def tensor_parallel_gaps(job: ParallelJob, gpus: int) -> list[str]:
    """The options of `job` set to what does not train tensor-parallel on `gpus` GPUs (the pairs
    refused whatever the GPUs are the compatibility table's): offloading the frozen models' shards
    where the slices are not sharded over data groups."""
    if job.train.frozen_offload and not slices_sharded(job, gpus):
        return ["train.frozen_offload=true without tensor slices sharded over the data groups"]
    return []


def refuse_expert_parallel(job: ParallelJob, gpus: int) -> None:
    """UsageError (one line) for a train.expert_parallel E > 1 training cannot run: E not dividing
    the world size (groups of E ranks, each holding every expert once) or the experts, a
    dense model (SFT's model, PPO/GRPO's policy), or in the reward-model stage; with an MoE model
    the compatibility table's mixture-of-experts pairs; train.expert_capacity_factor set without
    it (nothing to exchange). The options it does not run beside are the table's."""
    e, factor = job.train.expert_parallel, job.train.expert_capacity_factor
    if factor > 0 and e == 1:
        raise UsageError(
            f"train.expert_capacity_factor={factor} with train.expert_parallel=1: expected "
            "train.expert_parallel > 1 (the factor sizes its exchange) or the factor 0")
    if e == 1:
        return
    from ..model.hf_io import load_config
    model = job.trained_model
    moe = load_config(model).moe if model is not None else None
    problem = ("only SFT, PPO and GRPO train expert-parallel" if model is None
               else f"expected a divisor of the world size {gpus} (expert groups of E ranks)"
               if gpus % e
               else f"{model} is a dense model (no experts to shard)" if moe is None
               else f"expected a divisor of the model's {moe.num_experts} experts"
               if moe.num_experts % e
               else None)
    if problem is not None:
        raise UsageError(f"train.expert_parallel={e}: {problem}")
    job.refuse_pairs(True)


def refuse_context_parallel(job: ParallelJob, gpus: int) -> None:
    """UsageError (one line) for a train.context_parallel C > 1 the engine does not run: C not
    dividing the ranks, the reward-model stage, or the compatibility table's pairs with the model
    read (an MoE model: its router losses are per forward). The options it does not run beside
    are the table's."""
    c, t = job.train.context_parallel, job.train.tensor_parallel
    if c == 1:
        return
    from ..model.hf_io import load_config
    model = job.trained_model
    groups = ("context groups of C ranks" if t == 1 else
              f"C x train.tensor_parallel={t} ranks a data rank")
    problem = ("only SFT, PPO and GRPO train context-parallel" if model is None
               else f"expected a divisor of the world size {gpus} ({groups})" if gpus % (c * t)
               else None)
    if problem is not None:
        raise UsageError(f"train.context_parallel={c}: {problem}")
    job.refuse_pairs(load_config(model).moe is not None)


def fitting_sizes(world: int, config: ModelConfig) -> list[int]:
    """The tensor-parallel sizes T that divide the world size and the model's key/value heads."""
    return [t for t in range(1, world + 1) if world % t == 0 and config.num_kv_heads % t == 0
            and config.intermediate_size % t == 0
            and config.vocab_size > (t - 1) * -(-config.vocab_size // t)]


def check_tensor_parallel(t: int, world: int, config: ModelConfig,
                          option: str = "train.tensor_parallel") -> None:
    """A one-line ConfigValueError unless T divides the world size, the key/value heads and the MLP
    width, and every tensor rank gets vocabulary rows."""
    if t not in fitting_sizes(world, config):
        raise ConfigValueError(
            f"{option}={t}: expected a size dividing the {world} ranks and this model's "
            f"{config.num_kv_heads} key/value heads (and its {config.intermediate_size} MLP "
            "features); these fit: "
            f"{fitting_sizes(world, config)}")


def check_generate_tensor_parallel(t: int, world: int, config: ModelConfig) -> None:
    """`fusedrl generate --tensor-parallel T`: torchrun with a multiple of T ranks, T fitting the
    model."""
    if world == 1 or t < 1:
        raise ConfigValueError(
            f"--tensor-parallel {t}: expected a size dividing the number of ranks; run under "
            f"torchrun --nproc-per-node N with N a multiple of {t}")
    check_tensor_parallel(t, world, config, "--tensor-parallel")


def check_persistent_weights(alone: bool, gathers: bool) -> None:
    """HybridActor(persistent_weights=True): a ConfigValueError unless the policy is gathered for
    each rollout (`gathers`: FSDP2's shards, or tensor slices sharded over the data groups)."""
    if not gathers:
        got = "one process" if alone else "tensor slices copied across the data groups"
        raise ConfigValueError(
            f"persistent_weights=True: expected torchrun at tensor_parallel 1 or tensor "
            f"slices sharded over the data groups (got {got}, which gathers nothing)")
