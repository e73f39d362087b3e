"""A memory plan as text (a table per GPU) or as one JSON object."""
from __future__ import annotations

from .memory_plan import MemoryPlan
from .phases import CATEGORIES
from .units import format_bytes


def to_json(plan: MemoryPlan) -> dict:
    """{"fits": bool, "peak_bytes", "peak_phase", "gpu_memory", "gpus", "shard_group" (the GPUs an
    FSDP model is split over), "phases": {phase: {category:
    bytes per GPU, "total": ...}}, "models": [...], "host_optimizer_bytes", "advice": [...],
    "kv_pool": PPO's {"bytes", "tokens", "sequences", "sequence_tokens", "group"}
    (kv_pool.PoolFigures), else null}."""
    return {"stage": plan.stage, "gpus": plan.ranks, "shard_group": plan.shard_group,
            "gpu_memory": plan.gpu_memory,
            "fits": plan.fits,
            "peak_phase": plan.peak_phase, "peak_bytes": plan.peak,
            "phases": {name: {**cats, "total": plan.total(name)}
                       for name, cats in plan.phases.items()},
            "models": plan.models, "host_optimizer_bytes": plan.host_optimizer_bytes,
            "advice": plan.notes,
            "kv_pool": plan.kv_pool.as_dict() if plan.kv_pool else None}


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**8 else f"{n / 1e6:.2f}M"


def format_plan(plan: MemoryPlan, title: str) -> str:
    """The plan as a table of per-GPU bytes (phases x categories), the models, and the verdict."""
    group = (f", FSDP shard groups of {plan.shard_group}" if 1 < plan.shard_group < plan.ranks else
             "")
    lines = [
        f"{title}: {plan.ranks} GPU(s) x {format_bytes(plan.gpu_memory)}{group}, bytes per GPU"]
    for m in plan.models:
        trains = (f", trains {_params(m['trained_parameters'])}" if m["trained_parameters"] else
                  ", frozen")
        lines.append(
            f"  {m['role']}: {_params(m['parameters'])} parameters, {format_bytes(m['bytes'])} "
            "whole, "
            f"{'sharded' if m['sharded'] else 'whole on every GPU'}{trains}")
    header = ["phase", *CATEGORIES, "total"]
    rows = [[name, *(format_bytes(cats[c]) for c in CATEGORIES), format_bytes(plan.total(name))]
            for name, cats in plan.phases.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " +
                     "  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))))
    if plan.host_optimizer_bytes:
        lines.append(
            f"  optimizer state in CPU memory: {format_bytes(plan.host_optimizer_bytes)} per GPU's "
            "process")
    if plan.kv_pool is not None:
        lines.append(f"  {plan.kv_pool.line()}")
    pool_short = plan.kv_pool is not None and plan.kv_pool.problem() is not None
    verdict = "fits" if plan.fits else "does NOT fit" + (" (the KV pool: below)" * pool_short)
    lines.append(
        f"peak: {plan.peak_phase} {format_bytes(plan.peak)} of {format_bytes(plan.gpu_memory)}: "
        f"{verdict}")
    lines += plan.notes
    return "\n".join(lines)


def refusal(plan: MemoryPlan) -> str:
    """The one line a stage refuses an unfit run with."""
    if plan.kv_pool is not None and plan.kv_pool.problem():
        return f"the memory plan does not fit: {plan.kv_pool.problem()} (details: `fusedrl plan`)"
    phase = plan.phases[plan.peak_phase]
    top = sorted(phase, key=phase.get, reverse=True)[:3]
    parts = ", ".join(f"{c} {format_bytes(phase[c])}" for c in top)
    advice = f"; {plan.notes[0]}" if plan.notes else ""
    return (
        f"the memory plan does not fit: {plan.peak_phase} needs {format_bytes(plan.peak)} per GPU "
        "of "
        f"{format_bytes(plan.gpu_memory)} ({parts}){advice} (details: `fusedrl plan`; "
        f"train.memory_check=false skips this check)")
