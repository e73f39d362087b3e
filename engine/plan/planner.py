"""The plan of one stage config on N GPUs: build its models on the meta device, count each phase's
bytes (phases.py), and when it does not fit, say which single change (or which set) makes it fit.

`plan_stage(cfg, gpus, gpu_memory)` reads only config.json of the model directories: no weights,
no GPU. The precision is the one a CUDA run resolves (train.precision auto -> bf16-mixed).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from ..config import io as config_io
from ..errors import UsageError
from ..config.ppo import RLConfig
from ..config.train import RMConfig
from ..model.hf_io import load_config
from ..train.precision import param_dtype, resolve_precision
from .model_bytes import ppo_models, supervised_models
from .memory_plan import MemoryPlan
from .phases import host_optimizer_bytes, model_rows, plan_phases
from .setup import Setup
from .units import format_bytes
from .kv_pool import fit_to_free
from ..parallel.dims import shard_group_size
from ..parallel.validate import check_tensor_parallel, slices_sharded


def stage_of(cfg) -> str:
    """'sft', 'rm' or 'ppo' (GRPO is the PPO stage with other defaults)."""
    return "ppo" if isinstance(cfg, RLConfig) else "rm" if isinstance(cfg, RMConfig) else "sft"


@functools.lru_cache(maxsize=16)
def model_config(model_dir: str):
    """config.json of `model_dir` read once per process (the advice plans the same models again)."""
    return load_config(Path(model_dir))


def stage_setup(cfg, gpus: int, device: str = "cuda",
                gpus_per_node: int | None = None, gpu_memory: int | None = None) -> Setup:
    """The stage's models on the meta device, with the dtype train.precision gives on `device`, on
    `gpus` GPUs of `gpu_memory` bytes (what an auto KV pool fills) of nodes of `gpus_per_node`
    (default: one node; train.data_parallel=hybrid's shard group unless train.shard_group_size
    says)."""
    stage = stage_of(cfg)
    dtype = param_dtype(resolve_precision(cfg.train.precision, torch.device(device)))
    if stage == "ppo":
        rm = model_config(cfg.reward_model) if cfg.reward_model else None
        teacher = cfg.paths()[0].get("teacher")  # distill's frozen teacher
        parts = ppo_models(cfg, model_config(cfg.policy), rm, dtype,
                           model_config(teacher) if teacher else None)
    else:
        parts = supervised_models(stage, cfg, model_config(cfg.model), dtype)
    # One process is refused train.optimizer_offload (parallel/validate.py): nothing is offloaded.
    group = shard_group_size(cfg.train.data_parallel, gpus, cfg.train.shard_group_size,
                             gpus_per_node or gpus)
    offload = cfg.train.optimizer_offload and gpus > 1
    return Setup(stage, cfg, cfg.parallel_job(), parts, gpus, group, dtype, offload, gpu_memory,
                 fused=torch.device(device).type == "cuda")


def plan_stage(cfg, gpus: int, gpu_memory: int, device: str = "cuda",
               advise: bool = True, gpus_per_node: int | None = None) -> MemoryPlan:
    """Per-GPU bytes of every phase of `cfg` (a stage config) on `gpus` GPUs of `gpu_memory` bytes,
    `gpus_per_node` to a node (default: one node of `gpus`); advise: when it does not fit, plan the
    changes of `advice` too (a few more plans)."""
    if gpus < 1:
        raise ValueError(f"--gpus={gpus}: expected at least 1")
    if cfg.train.gradient_checkpointing == "auto":
        return _plan_auto_checkpointing(cfg, gpus, gpu_memory, device, advise, gpus_per_node)
    s = stage_setup(cfg, gpus, device, gpus_per_node, gpu_memory)
    policy = s.parts[0].config
    check_tensor_parallel(cfg.train.tensor_parallel, gpus, policy, option="train.tensor_parallel")
    phases, pool = plan_phases(s)
    plan = MemoryPlan(s.stage, gpus, gpu_memory, phases, model_rows(s), host_optimizer_bytes(s),
                      shard_group=s.shard_group, kv_pool=pool,
                      checkpointing=cfg.train.checkpointing())
    if plan.peak > gpu_memory:  # what to change first (an auto pool is empty then)
        plan.notes = advice(cfg, plan, device) if advise else []
    elif pool is not None:
        plan.notes = [note for note in (pool.problem(), pool.warning()) if note]
    return plan


def _plan_auto_checkpointing(cfg, gpus, gpu_memory, device, advise, gpus_per_node):
    """plan_stage of `cfg` with train.gradient_checkpointing=auto resolved (auto_checkpointing's
    rule): off where the run fits without it, else on; the plan's first note says which."""
    def plan(on: bool, advise: bool = advise) -> MemoryPlan:
        resolved = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, gradient_checkpointing=on))
        return plan_stage(resolved, gpus, gpu_memory, device, advise, gpus_per_node)
    if torch.device(device).type != "cuda" or cfg.train.activation_offload:
        on = cfg.train.checkpointing()  # auto's rule off CUDA, and with the offload
        chosen = plan(on)
        chosen.notes.insert(0, f"train.gradient_checkpointing=auto: {'on' if on else 'off'} "
                               f"({'with train.activation_offload' if on else 'off CUDA'})")
        return chosen
    off = plan(False, advise=False)  # a plan that fits has no advice to give
    if roomy(off):
        off.notes.insert(0, "train.gradient_checkpointing=auto: off (the run fits without it)")
        return off
    chosen = plan(True)
    if off.fits:  # roomy's other rule: the pool beside the unrecomputed activations
        why = (f"the KV pool would hold {off.kv_pool.sequences} full-length sequences, fewer "
               f"than one group of {off.kv_pool.group}")
    else:
        why = (f"peak {format_bytes(off.peak)} in {off.peak_phase}, over "
               f"{format_bytes(gpu_memory)}")
    chosen.notes.insert(0, f"train.gradient_checkpointing=auto: on (without it: {why})")
    return chosen


def roomy(plan: MemoryPlan) -> bool:
    """The plan fits, and an auto KV pool (where there is one) holds at least one group of
    full-length sequences at once: recomputing layers costs less than decoding a group in turns."""
    return plan.fits and (plan.kv_pool is None or plan.kv_pool.warning() is None)


def auto_checkpointing(cfg, device: torch.device, gpus: int, gpus_per_node: int,
                       plan: MemoryPlan | None = None) -> bool:
    """train.gradient_checkpointing resolved for a run on `gpus` GPUs like `device`: as given, or
    for auto, by the run's plan on CUDA (`plan`, that plan when the caller made it already: the
    rule is _plan_auto_checkpointing's) and off on the CPU (on with train.activation_offload)."""
    if cfg.train.gradient_checkpointing != "auto" or device.type != "cuda":
        return cfg.train.checkpointing()
    if plan is None:
        total = torch.cuda.get_device_properties(device).total_memory
        plan = plan_stage(cfg, gpus, total, advise=False, gpus_per_node=gpus_per_node)
    return plan.checkpointing


def with_overrides(cfg, overrides: list[str]):
    """`cfg` with `key=value` overrides applied (validated again, as the command line would)."""
    return config_io.from_dict(type(cfg),
                               config_io.apply_overrides(config_io.to_dict(cfg), overrides))


def candidate_changes(cfg, gpus: int) -> list[tuple[str, list[str], int]]:
    """(what it is, overrides, GPUs) of each change the advice tries."""
    out = []
    moe = model_config(cfg.policy if isinstance(cfg, RLConfig) else cfg.model).moe is not None
    # Offloading moves FSDP2's shards: none of a LoRA run's adapters, nor of tensor slices copied
    # across the data groups.
    if not cfg.train.optimizer_offload and gpus > 1 and cfg.lora.rank == 0 and (
            cfg.train.tensor_parallel == 1 or slices_sharded(cfg.parallel_job(), gpus)):
        out.append(
            ("offload the optimizer state to CPU memory", ["train.optimizer_offload=true"], gpus))
    if not cfg.train.gradient_checkpointing:
        out.append(
            ("recompute activations in backward", ["train.gradient_checkpointing=true"], gpus))
    elif not cfg.train.activation_offload:
        out.append(("keep the checkpointed layers' inputs in CPU memory",
                    ["train.activation_offload=true"], gpus))
    if cfg.lora.rank == 0:
        # An MoE model's adapters go on attention only (lora.add_lora refuses MLP targets there).
        out.append(("train LoRA adapters only", ["lora.rank=64"] + (
            ["lora.target_modules=q_proj,k_proj,v_proj,o_proj"] if moe else []), gpus))
    if isinstance(cfg, RLConfig):
        if cfg.ppo.microbatch_size != 1:
            out.append(("a smaller token budget per forward", ["ppo.tokens_per_microbatch=null",
                                                               "ppo.microbatch_size=1"], gpus))
    elif cfg.data.tokens_per_microbatch != cfg.data.max_length:
        out.append(
            ("a smaller token budget per forward",
             [f"data.tokens_per_microbatch={cfg.data.max_length}"], gpus))
    # Under train.data_parallel=hybrid a GPU's shards are 1/(its shard group): more nodes change
    # nothing.
    if gpus < 8 and 8 % cfg.train.tensor_parallel == 0 and cfg.train.data_parallel != "hybrid":
        out.append(("more GPUs", [], 8))
    return out


def accepts(cfg, overrides: list[str]) -> bool:
    """Whether `cfg` with `overrides` is a config (not refused, e.g. by a pair of the compatibility
    table: LoRA beside an offloaded optimizer)."""
    try:
        with_overrides(cfg, overrides)
    except UsageError:
        return False
    return True


def composing(cfg, changes: list[list[str]]) -> list[str]:
    """The overrides of `changes`, in turn, each kept unless the config refuses it beside those kept
    before."""
    kept: list[str] = []
    for overrides in changes:
        if accepts(cfg, kept + overrides):
            kept += overrides
    return kept


def advice(cfg, plan: MemoryPlan, device: str) -> list[str]:
    """What to change: each single change that fits, else all of them together, else what blocks."""
    changes = [c for c in candidate_changes(cfg, plan.ranks) if accepts(cfg, c[1])]
    fitting = []
    for what, overrides, gpus in changes:
        other = plan_stage(with_overrides(cfg, overrides), gpus, plan.gpu_memory, device,
                           advise=False, gpus_per_node=plan.shard_group)
        if other.fits:
            fitting.append(
                f"{what} ({' '.join(overrides) or f'--gpus {gpus}'}): peak "
                f"{format_bytes(other.peak)} in {other.peak_phase}")
    if fitting:
        return ["fits with any one of: " + "; ".join(fitting)]
    overrides = composing(cfg, [os_ for _, os_, _ in changes])
    gpus = max([plan.ranks] + [g for *_, g in changes])
    together = plan_stage(with_overrides(cfg, overrides), gpus, plan.gpu_memory, device,
                          advise=False, gpus_per_node=plan.shard_group) if changes else plan
    if together.fits:
        return [
            f"fits with all of: {' '.join(overrides)} --gpus {gpus} (peak "
            f"{format_bytes(together.peak)} in {together.peak_phase})"]
    return [blocker(plan, "needs"), "no change tried fits: with all of them "
            f"({' '.join(overrides)} --gpus {gpus}) " + blocker(together, "still needs")]


def blocker(plan: MemoryPlan, verb: str) -> str:
    """'PHASE needs X, most of it CATEGORY (Y): why' for the plan's peak phase."""
    phase = plan.phases[plan.peak_phase]
    biggest = max(phase, key=phase.get)
    why = _why(plan, plan.peak_phase, biggest)
    return (f"{plan.peak_phase} {verb} {format_bytes(plan.peak)}, most of it {biggest} "
            f"({format_bytes(phase[biggest])})" + (f": {why}" if why else ""))


def _why(plan: MemoryPlan, phase: str, category: str) -> str:
    """Why `category` cannot shrink with any option, by the engine behaviour it comes from."""
    if (phase, category) == ("rollout", "gathered"):
        return (
            "generation gathers the whole policy on every GPU at train.tensor_parallel=1 (T > 1 "
            "reads 2P/T bytes per GPU, LoRA or not)")
    whole = [m["role"] for m in plan.models
             if not m["sharded"] and m["parameters"] > m["trained_parameters"]]
    if category == "weights" and plan.ranks > 1 and whole:
        return (f"not sharded: {', '.join(whole)} (a LoRA-adapted model's frozen base is whole on "
                "every GPU)")
    return ""


def rollout_kv_bytes(cfg, device: torch.device, gpus: int, gpus_per_node: int) -> int:
    """The bytes of KV pool a PPO run allocates on `device`: on CUDA the plan's pool (pool_bytes, by
    the plan of this run on `gpus` GPUs), shrunk by what the GPU really lacks for the plan's peak
    (torch.cuda.mem_get_info plus what torch holds already: another process, a larger CUDA context);
    UsageError when it then holds no full-length sequence. On the CPU: bytes as given, else
    1 GiB."""
    from ..inference.llm import CPU_DEFAULT_KV_BYTES
    budget = cfg.rollout.kv_cache_memory
    if device.type != "cuda":
        if isinstance(budget, float):
            raise UsageError(f"rollout.kv_cache_memory={budget} is a fraction of the GPU's memory: "
                             f"the run is on {device.type}; give bytes (an int) or auto")
        return CPU_DEFAULT_KV_BYTES if budget == "auto" else budget
    total = torch.cuda.get_device_properties(device).total_memory
    plan = plan_stage(cfg, gpus, total, advise=False, gpus_per_node=gpus_per_node)
    free, _ = torch.cuda.mem_get_info(device)
    return fit_to_free(plan.kv_pool, plan.peak, free + torch.cuda.memory_reserved(device))
