"""`fusedrl bench` under torchrun (options.PER_RANK_SUITES: train, rl): each rank on its own
device (cuda:LOCAL_RANK on a GPU, the CPU with gloo), the process group they share, the
repetition count every rank agrees on (each rank's choice reduced to one, so every rank issues the
same number of collectives), and a row's figures combined over the ranks (rank 0 records it).
One process (no torchrun): world 1, nothing reduced."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

# Figures summed over the ranks (a rate each rank reaches on its own GPU), and those taken from
# the slowest rank (a step ends when its last rank does; the rl suite's phases and weight sync
# too).
SUMMED = ("tokens_per_s", "tokens_per_s_per_gpu")
SLOWEST = ("seconds", "seconds_p20", "seconds_p80", "weight_sync_s", "time_generate", "time_score",
           "time_reference", "time_old", "time_train")
T = TypeVar("T")


def world_size() -> int:
    """torchrun's WORLD_SIZE (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the files and prints (rank 0, or the only process)."""
    return rank() == 0


def start(device_type: str) -> torch.device:
    """This rank's device (cuda:LOCAL_RANK, else the CPU), the process group started when
    WORLD_SIZE > 1 (nccl on GPUs, gloo on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if device_type == "cuda"
                          else "cpu")
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce(values: list[float], op) -> list[float]:
    """values all-reduced with op over the ranks (on the group backend's device)."""
    cuda = dist.get_backend() == "nccl"
    t = torch.tensor(values, dtype=torch.float64,
                     device=f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def several() -> bool:
    """Whether this process is one of several ranks in a started process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def made_once(make: Callable[[], T]) -> T:
    """make()'s value made on rank 0 alone and given to every rank (its result must pickle: a
    directory's path, say), the others waiting for it; make() in one process. What only rank 0
    can do: transformers' save_pretrained writes on global rank 0 alone once a process group is
    started, so a checkpoint every rank reads is written there (one machine: a local path). An
    error there is raised on every rank, so that every rank leaves the case at the same point."""
    if not several():
        return make()
    box: list = [None]
    failure = None
    if is_main():
        try:
            box[0] = ("ok", make())
        except Exception as error:  # the others are told, then it is raised here too
            failure, box[0] = error, ("error", f"{type(error).__name__}: {error}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if failure is not None:
        raise failure
    if status != "ok":
        raise RuntimeError(f"on rank 0: {value}")
    return value


def agreed_count(count: int) -> int:
    """The repetition count every rank runs: the smallest of the ranks' choices (count: this
    rank's choice; itself in one process)."""
    return int(agreed_least(count))


def agreed_least(value: float) -> float:
    """The smallest of the ranks' values (value: this rank's; itself in one process)."""
    return _reduce([value], dist.ReduceOp.MIN)[0] if several() else value


def average_gradients(parameters) -> None:
    """Each parameter's gradient averaged over the ranks, in one flat all-reduce (as DDP's
    buckets are)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def combine(row: dict) -> dict:
    """row with its figures over every rank (called by every rank, for every row, in the same
    order): world_size; the time of the slowest rank; tokens/s per GPU (the ranks' mean) and in
    total (their sum). A row some rank did not measure keeps this rank's status."""
    if not several():
        return row
    world = dist.get_world_size()
    ok = row.get("status") == "ok"
    keys = SUMMED + SLOWEST
    have = [float(ok and row.get(k) is not None) for k in keys]
    mine = [float(row[k]) if h else 0.0 for k, h in zip(keys, have)]
    counts = _reduce(have, dist.ReduceOp.SUM)
    sums = _reduce(mine[:len(SUMMED)], dist.ReduceOp.SUM)
    slowest = _reduce(mine[len(SUMMED):], dist.ReduceOp.MAX)
    row["world_size"] = world
    if not ok or any(c not in (0, world) for c in counts):
        return row
    for key, count, total in zip(SUMMED, counts, sums):
        if count == world:  # per GPU: the mean rank; in total: all of them
            row.pop(key, None)
            row["tokens_per_s_per_gpu"] = total / world
            row["tokens_per_s_total"] = total
    for key, count, value in zip(SLOWEST, counts[len(SUMMED):], slowest):
        if count == world:
            row[key] = value
    return row
