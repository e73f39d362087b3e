"""The rl suite, with bench_ppo.py's measuring code: one GRPO and one PPO iteration (the second of
two; the first warms up) of ours, time per phase (generate, score, reference and old log-probs,
train: the update with its optimizer steps), tokens/s per GPU, the weight-sync time (the actor's
`whole_weights()` measured after the update, and whether the generator reads the policy's own
storage), and the peak memory beside `fusedrl plan`'s prediction for the same config. The peers on
the same checkpoint and prompts where installed: TRL 1.x's GRPOTrainer, and for PPO trl 0.29's
`trl.experimental.ppo` (TRL 1.x ships no PPO trainer); a missing one's row says so. Each is the
first trl on the path that serves it (`trl_peer`), run in a process with it first on its path
where another trl comes first here (a visit's path: TRL 1.x, then the tests' trl 0.29.1).

Under torchrun every rank runs the iteration on its own GPU, every rank the whole batch (its
policy FSDP-sharded over the ranks, gathered for each rollout): the rows give tokens/s per GPU (the
ranks' mean) and in total, and the slowest rank's times (ranks.combine). The iteration count is
fixed (two), so every rank issues the same collectives. The checkpoints are written on rank 0 and
read by every rank (ranks.made_once). The peers' rows say they were not run (SEVERAL_RANKS_PEER).

Measured peak: torch.cuda.max_memory_allocated over the measured iteration on a GPU, above what the
process held before the side began, the KV pool the actor allocated included, as the plan's peak
includes it (both pools in the row: kv_pool_gib, plan_kv_pool_gib; its note says so); on the CPU the
process's peak resident set (torch, the models and everything else the process ever held, a bound
that is not comparable to the plan's device bytes; labelled so). fraction_of_limit: the iteration's
model FLOPs per second over the device's FLOP/s, with 2 FLOPs per policy parameter per token per
forward (generate, reference, old: one each; the update three: forward and backward) over every
row's prompt and response tokens, and for PPO the critic's (4) and the reward model's (1) forwards
of the same shape: attention left out, an estimate.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import resource
import types
from pathlib import Path

import torch

from .. import bench_ppo, ranks, results, shapes
from ..cases import Case
from ..context import Context, free_device, peer_version

SUITE = "rl"
CHECKPOINTS = ("rl policy", "rl reward model")  # the Context.shared keys of its checkpoints
# PROMPTS x SAMPLES x PROMPT_LEN x NEW_TOKENS, minibatches, rows per micro-batch.
SHAPES = {("grpo", False): ((16, 8, 128, 256), 4, 16), ("ppo", False): ((32, 4, 128, 256), 4, 16),
          ("grpo", True): ((2, 4, 16, 16), 2, 2), ("ppo", True): ((4, 2, 16, 16), 2, 2)}
# Forward passes per token of each model of the iteration (see the docstring).
PASSES = {"grpo": 1 + 1 + 1 + 3, "ppo": (1 + 1 + 1 + 3) + (1 + 3) + 1}
PHASES = ("generate", "score", "reference", "old", "train")
# Under torchrun the peer is not run: TRL's trainer would start its own data-parallel run over the
# ranks' process group (accelerate), not one process per GPU beside ours.
SEVERAL_RANKS_PEER = ("not run: under torchrun (TRL's trainer would join the ranks' process "
                      "group); `fusedrl bench rl` without torchrun runs it")
PEAK_NOTE = ("peak: the allocator's over the measured iteration above what the process held "
             "before; it and the plan's both hold the KV pool (kv_pool_gib, plan_kv_pool_gib)")


def _shape(algo: str, quick: bool) -> bench_ppo.Shape:
    dims, minibatches, micro = SHAPES[algo, quick]
    return bench_ppo.Shape(*dims, minibatches, micro)


def _name(algo: str, shape: bench_ppo.Shape, label: str) -> str:
    return (f"{algo} iteration {shape.prompts}x{shape.samples} rows, prompt {shape.prompt_len}, "
            f"{shape.new_tokens} new ({label})")


def ours_row(ctx: Context, algo: str, shape, name: str, r: dict) -> dict:
    tokens = shape.rows * (shape.prompt_len + shape.new_tokens)
    flops = 2 * r["policy_parameters"] * tokens * PASSES[algo]
    per_gpu = r["response_tokens"] / r["iteration_s"]  # this rank's rows on its GPU
    peak = {"peak_gib": r["peak_gib"], "note": PEAK_NOTE} if r.get("peak_gib") is not None else {
        "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return results.make_row(
        SUITE, name, "fusedrl", fraction_of_limit=ctx.flops_fraction(flops / r["iteration_s"]),
        limit="model FLOP/s (estimate)", seconds=r["iteration_s"],
        tokens_per_s_per_gpu=per_gpu, response_tokens=r["response_tokens"],
        **{f"time_{p}": r.get(f"time_{p}") for p in PHASES},
        weight_sync_s=r["weight_sync_s"],
        weight_copies=0 if r["weights_shared"] else 1, plan_peak_gib=r["plan_peak_gib"],
        kv_pool_gib=r["kv_pool_gib"], plan_kv_pool_gib=r["plan_kv_pool_gib"], **peak)


@dataclasses.dataclass(frozen=True)
class TrlPeer:
    """The trl release an algorithm's peer runs: its version, the path entry holding it, and
    whether it is the first trl on the path (the one `import trl` finds here)."""
    version: str
    location: str
    first: bool


def trl_peer(algo: str) -> TrlPeer | None:
    """The first trl on the path that serves `algo`'s peer (GRPO: TRL 1.x's GRPOTrainer; PPO:
    `trl.experimental.ppo`, trl 0.29's: TRL 1.x ships none), though another trl comes first: a
    visit's path holds TRL 1.x first (GRPO, the fused heads) and the tests' trl 0.29.1 after it,
    whose PPO trainer no import of `trl` would reach. None when no trl on the path serves it."""
    for i, dist in enumerate(importlib.metadata.distributions(name="trl")):
        serves = (int(dist.version.split(".")[0]) >= 1 if algo == "grpo" else
                  Path(dist.locate_file("trl/experimental/ppo/__init__.py")).is_file())
        if serves:
            return TrlPeer(dist.version, str(dist.locate_file("")), i == 0)
    return None


def peer_status(algo: str) -> tuple[str | None, str]:
    """(impl name, "ok") when the algorithm's TRL peer can run here, else (None, why not)."""
    peer, version = trl_peer(algo), peer_version("trl")
    if peer is not None:
        return f"trl {peer.version} {'GRPOTrainer' if algo == 'grpo' else 'PPOTrainer'}", "ok"
    if version is None:
        return None, "not installed"
    if algo == "grpo":
        return None, f"not installed (TRL 1.x; found trl {version})"
    return None, f"not installed (trl {version} has no PPO trainer; trl 0.29's has)"


def peer_row(ctx: Context, algo: str, shape, name: str, dirs, parameters: int) -> dict:
    """The algorithm's TRL peer on the same checkpoints and prompts (`parameters`: the policy's,
    for the same FLOP estimate as ours): in this process on the CPU, in its own on a GPU (its
    peak memory its own)."""
    impl, status = peer_status(algo)
    limit = "model FLOP/s (estimate)"
    if impl is not None and ranks.several():
        impl, status = None, SEVERAL_RANKS_PEER
    if impl is None:
        return results.missing_row(SUITE, name, "trl", status, limit)
    args = types.SimpleNamespace(algo=algo, shape=shape, quick=ctx.device.type == "cpu", lora=0,
                                 trl_rollout_rows=0)
    free_device(ctx.device)  # what our side left (its models, the KV pool) is the peer's now
    peer = trl_peer(algo)
    if args.quick and peer.first:
        run = bench_ppo.run_in_this_process
    else:  # its trl first on the process's path, where another trl comes first here
        run = functools.partial(bench_ppo.run_in_subprocess,
                                first_on_path=None if peer.first else peer.location)
    r = bench_ppo.run_fitting(run, "trl", args, dirs)
    if "error" in r:
        return results.missing_row(SUITE, name, impl, r["error"][:200], limit)
    flops = 2 * parameters * shape.rows * (shape.prompt_len + shape.new_tokens) * PASSES[algo]
    return results.make_row(
        SUITE, name, impl, fraction_of_limit=ctx.flops_fraction(flops / r["iteration_s"]),
        limit=limit, seconds=r["iteration_s"], response_tokens=r["response_tokens"],
        tokens_per_s_per_gpu=r["response_tokens"] / r["iteration_s"],
        time_generate=r.get("time_generate"),
        **({"peak_gib": r["peak_gib"]} if r.get("peak_gib") is not None else {}),
        **({"rollout_forward_rows": r["local_rollout_forward_batch_size"]}
           if "local_rollout_forward_batch_size" in r else {}))


def _by_rank_0(release):
    """release(made) on rank 0 alone, which made it (ranks.made_once)."""
    return lambda made: release(made) if ranks.is_main() else None


def checkpoints(ctx: Context):
    """The policy's random-init checkpoint (and, made when PPO first needs it, a reward model of
    the same architecture and shape), shared by the suite's cases: written on rank 0 under
    torchrun, read by every rank."""
    return ctx.shared(CHECKPOINTS[0], lambda: ranks.made_once(lambda: shapes.model_dir(
        ctx.options.model, ctx.quick, ctx.options.seed, torch.float32, ctx.device)),
        _by_rank_0(shapes.ModelDir.remove), on_disk=True)


def reward_dir(ctx: Context, policy):
    import shutil

    import transformers

    def make():
        return bench_ppo.build_reward_model_dir(
            ctx.quick, transformers.AutoConfig.from_pretrained(policy.path), ctx.device)
    return ctx.shared(CHECKPOINTS[1], lambda: ranks.made_once(make),
                      _by_rank_0(lambda path: shutil.rmtree(path, True)), on_disk=True)


def iteration_name(ctx: Context, algo: str) -> str:
    label = shapes.model_label(ctx.options.model, ctx.quick, ctx.options.seed)
    return _name(algo, _shape(algo, ctx.quick), label)


def iteration_dirs(ctx: Context, algo: str) -> tuple:
    """(policy, reward model) directories of the algorithm's iteration (GRPO: the policy's twice,
    its reward a function)."""
    policy = checkpoints(ctx)
    return policy.path, reward_dir(ctx, policy) if algo == "ppo" else policy.path


def ours_rows(ctx: Context, algo: str):
    shape = _shape(algo, ctx.quick)
    r = bench_ppo.run_side("ours", algo, shape, iteration_dirs(ctx, algo),
                           ctx.device.type == "cpu", 0)
    yield ours_row(ctx, algo, shape, iteration_name(ctx, algo), r)


def peer_rows(ctx: Context, algo: str):
    """The algorithm's TRL peer on our checkpoints (their policy's parameters: the same FLOP
    estimate as ours)."""
    import transformers
    dirs = iteration_dirs(ctx, algo)
    with torch.device("meta"):  # counted, not made
        policy = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(dirs[0]))
    yield peer_row(ctx, algo, _shape(algo, ctx.quick), iteration_name(ctx, algo), dirs,
                   sum(p.numel() for p in policy.parameters()))


def ours_case(ctx: Context, algo: str) -> Case:
    return Case(SUITE, iteration_name(ctx, algo), ("fusedrl",),
                functools.partial(ours_rows, ctx, algo), shares=CHECKPOINTS, model_paths=True)


def peer_case(ctx: Context, algo: str) -> Case:
    return Case(SUITE, iteration_name(ctx, algo), ("trl",),
                functools.partial(peer_rows, ctx, algo), shares=CHECKPOINTS)


def cases(ctx: Context) -> list[Case]:
    """A GRPO and a PPO iteration, each ours then its peer (a case each: the device freed
    between them)."""
    return [case(ctx, algo) for algo in ("grpo", "ppo") for case in (ours_case, peer_case)]
