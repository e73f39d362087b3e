"""The start-up check every training stage runs (engine/train/run_setup.py:start_run): the memory
plan of the run on its GPUs, a run that cannot fit refused with one line before any model loads."""
from __future__ import annotations

import torch

from ..config.train import SFTConfig
from ..parallel.distributed import local_world_size, shard_group_size
from ..errors import UsageError
from .planner import plan_stage, slices_sharded
from .report import refusal


def tensor_parallel_gaps(cfg, gpus: int) -> list[str]:
    """The options of `cfg` set to what does not train tensor-parallel yet on `gpus` GPUs: dropout on
    LoRA adapters (the policy's or the critic's: each tensor rank would draw its own mask on the same
    input), the batch-invariant rollout (its fixed reduction order is one device's, not the tensor
    ranks'), and offloading the frozen models' shards where the slices are not sharded over data groups."""
    gaps = [f"{name}.dropout={lora.dropout}" for name in ("lora", "critic_lora")
            if (lora := getattr(cfg, name, None)) is not None and lora.enabled and lora.dropout > 0]
    if getattr(getattr(cfg, "rollout", None), "exact", False):
        gaps.append("rollout.exact=true")
    if getattr(cfg.train, "frozen_offload", False) and not slices_sharded(cfg, gpus):
        gaps.append("train.frozen_offload=true without tensor slices sharded over the data groups")
    return gaps


def refuse_unfit(cfg, device: torch.device, gpus: int) -> None:
    """UsageError (exit 2) when `cfg`'s plan on `gpus` GPUs like `device` does not fit. Only on CUDA,
    where the memory is known, and unless train.memory_check is off; also refuses
    train.optimizer_offload and train.frozen_offload in one process (they are FSDP2's CPU offload of the
    sharded state), train.optimizer_offload beside LoRA adapters or copied tensor slices, and
    train.tensor_parallel > 1 beside what does not run tensor-parallel yet (tensor_parallel_gaps),
    rollout.persistent_weights where nothing is gathered (one process, tensor slices copied), and
    train.data_parallel=hybrid with a shard group that does not divide the ranks."""
    if cfg.train.optimizer_offload and gpus == 1:
        raise UsageError("train.optimizer_offload=true offloads FSDP2's sharded parameters, gradients and "
                         "optimizer state: run under torchrun (one process keeps them on its device)")
    if getattr(cfg.train, "frozen_offload", False) and gpus == 1:
        raise UsageError("train.frozen_offload=true offloads the frozen models' FSDP2 shards: run under torchrun "
                         "(one process keeps them on its device)")
    if cfg.train.optimizer_offload and (cfg.lora.rank > 0 or (cfg.train.tensor_parallel > 1
                                                              and not slices_sharded(cfg, gpus))):
        raise UsageError(f"train.optimizer_offload=true with lora.rank={cfg.lora.rank} and train.tensor_parallel="
                         f"{cfg.train.tensor_parallel} on {gpus} GPUs at train.data_parallel="
                         f"{cfg.train.data_parallel}: "
                         "expected lora.rank=0 and train.tensor_parallel=1, or tensor slices sharded over the data "
                         "groups (train.data_parallel=shard, more GPUs than T) (LoRA's optimizer state is small; "
                         "copied slices are not offloaded)")
    if cfg.train.tensor_parallel > 1 and (unsupported := tensor_parallel_gaps(cfg, gpus)):
        raise UsageError(f"train.tensor_parallel={cfg.train.tensor_parallel} with {', '.join(unsupported)}: not "
                         "supported tensor-parallel yet (SFT, RM, PPO and GRPO train tensor-parallel, LoRA included)")
    refuse_expert_parallel(cfg, gpus)
    t = cfg.train.tensor_parallel
    copies = t > 1 and not slices_sharded(cfg, gpus)  # slices read where they lie
    if getattr(getattr(cfg, "rollout", None), "persistent_weights", False) and (gpus == 1 or copies):
        where = ("one process" if gpus == 1 else f"train.tensor_parallel={t} on {gpus} GPUs at train.data_parallel="
                 f"{cfg.train.data_parallel}{' with lora' if cfg.lora.rank > 0 else ''}")
        raise UsageError(f"rollout.persistent_weights=true keeps a gathered copy of the policy's FSDP2 shards: "
                         f"expected torchrun at train.tensor_parallel=1, or tensor slices sharded over the data groups "
                         f"(got {where}, which gathers nothing)")
    # train.data_parallel=hybrid: a shard group (one node's ranks unless train.shard_group_size) dividing the ranks.
    shard_group_size(cfg.train.data_parallel, gpus, cfg.train.shard_group_size)
    if device.type != "cuda" or not cfg.train.memory_check:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    plan = plan_stage(cfg, gpus, total, gpus_per_node=local_world_size())
    if not plan.fits:
        raise UsageError(refusal(plan))


def refuse_expert_parallel(cfg, gpus: int) -> None:
    """UsageError (one line) for a train.expert_parallel E > 1 training cannot run: E not dividing
    the world size (groups of E ranks, each holding every expert once) or the experts, a
    dense model (SFT's model, PPO/GRPO's policy), beside tensor parallelism, LoRA, optimizer offload
    or replicated data parallelism, or in the reward-model stage."""
    e = getattr(cfg.train, "expert_parallel", 1)
    if e == 1:
        return
    from ..model.hf_io import load_config
    model = cfg.model if isinstance(cfg, SFTConfig) else getattr(cfg, "policy", None)
    moe = load_config(model).moe if model is not None else None
    problem = ("only SFT, PPO and GRPO train expert-parallel yet" if model is None
               else f"expected a divisor of the world size {gpus} (expert groups of E ranks)" if gpus % e
               else f"{model} is a dense model (no experts to shard)" if moe is None
               else f"expected a divisor of the model's {moe.num_experts} experts" if moe.num_experts % e
               else "expected train.tensor_parallel=1, lora.rank=0, train.optimizer_offload=false and "
                    "train.data_parallel=shard beside it" if (cfg.train.tensor_parallel > 1 or cfg.lora.rank > 0
                                                              or cfg.train.optimizer_offload
                                                              or cfg.train.data_parallel != "shard")
               else None)
    if problem is not None:
        raise UsageError(f"train.expert_parallel={e}: {problem}")
