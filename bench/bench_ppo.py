"""One PPO iteration, ours vs TRL's PPOTrainer, on the same models and batch: time split, tokens/s
and peak memory.

Both sides get the same checkpoints, written once by this script: a random-init policy of the
Qwen2.5-0.5B shape (also the frozen reference) and a random-init reward model of the same shape
(`Qwen2ForSequenceClassification`, one label); the critic is a value model initialized from the
reward model (InstructGPT's default, and TRL's only critic). On the GPU ours trains in bf16-mixed
(bf16 weights, fp32 masters in the optimizer, no autocast) and TRL in fp32 weights with bf16
autocast; AdamW on policy and critic, a k1 KL penalty, one PPO epoch over `minibatches`
minibatches of micro-batches of `micro` rows (the same rows per forward on both sides).

- ours: `fusedrl.engine.stages.ppo` (experience.py, update.py: hybrid actor generating through the paged-KV engine from the policy's
  own weights, fused log-prob/KL/GAE/loss kernels, packed varlen forwards);
- TRL: `trl.experimental.ppo.PPOTrainer` of trl==0.29.1 (TRL 1.x ships no PPO trainer). It samples
  one response per prompt, so it gets the batch's rows as prompts repeated `samples` times. Both
  sides generate exactly `new_tokens` tokens per row (TRL without a stop token, ours with
  `rollout.ignore_eos`): the same work, whatever the random model samples. Ours generates from the
  bf16 weights themselves (one copy), TRL under bf16 autocast. TRL generates with HF `generate`, in
  chunks of `local_rollout_forward_batch_size` rows (TRL's default, 64), and it keeps the fp32
  scores of every generated token, [rows, new_tokens, vocab]: 20 GB at the default 128 rows x 256
  tokens. At 16x4 and 32x4 rows of 128 + 256 tokens its default ran out of an H100's 80 GB
  (bench/results/2026-11-23-h100), so a side that runs out of memory runs again with half the rows
  per chunk, down to `micro` (`run_fitting`; --trl-rollout-rows sets them), its result naming the
  rows it ran. TRL's phases are not separable from outside beyond generation, so it reports
  `generate` and the rest. With gradient accumulation over the whole batch, TRL steps its
  optimizer once per epoch rather than once per minibatch (its accelerate setup); the optimizer
  step is a small share of the iteration.

`--algo grpo`: one GRPO iteration instead (critic-free, 8 samples per prompt by default, a verifiable
reward function of the token ids, `even_token_share`, the KL to the reference as a loss term with
coefficient 0.001 on both sides), against TRL's `GRPOTrainer` (no vLLM: HF `generate`): TRL 1.x's,
its fused head on by default, where TRL 1.x comes first on the path (.ci-trl, .whl/trl1: the peer
`fusedrl bench rl` asks for); the test extra's trl 0.29.1 runs the same trainer otherwise.
Both sides get a word-level tokenizer whose token i reads `t<i>`, so prompts go in and completions
come out as the same ids on both sides and the reward function reads them back from the text. TRL
generates the whole batch once and takes `minibatches` optimizer steps over it (its
`steps_per_generation`); an iteration there is those steps.

`--lora R`: rank-R LoRA on every projection of the policy (alpha 2R; the critic trains whole), as
two more sides: `ours_lora` (no reference model: the policy with its adapters off) and `trl_lora`
(TRL's trainer with a PEFT `LoraConfig`, its reference the adapters disabled too). The comparison
adds the LoRA run's peak memory and iteration time over full fine-tuning's (`ours_lora` / `ours`)
and the speedup over TRL with PEFT. peft must be installed for `trl_lora` (tests/tools/peer_wheels.sh).

Each side runs in its own process (so each peak is its own) for two iterations: the first warms up,
the second is measured. Peak memory is `torch.cuda.max_memory_allocated` over the measured
iteration: everything resident (four models, optimizer state, KV pool or cache, activations).
`--quick` runs a tiny model on the CPU to check the script (CPU timings are not GPU timings), every
side in this process: the CPU has no peak to keep apart, and a process per side would import torch
and TRL again.

    python bench/bench_ppo.py                      # GPU: 32 prompts x 4 samples, prompt 128, 256 new
    python bench/bench_ppo.py --quick              # CPU smoke run of both sides
    python bench/bench_ppo.py --sides ours         # ours only (the default when trl is not installed)
    python bench/bench_ppo.py --algo grpo          # GPU: 16 prompts x 8 samples, prompt 128, 256 new
    python bench/bench_ppo.py --lora 16 --sides ours ours_lora   # LoRA vs full fine-tuning, ours
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

from fusedrl.bench import harness, triton_compiles
from fusedrl.bench.ppo_common import (GRPO_KL_COEF, PAD_ID, IterationClock, Shape,  # noqa: F401
                                      build_tokenizer, even_token_share, lora_targets,
                                      make_prompts)
from fusedrl.bench.ppo_trl import ROLLOUT_ROWS, run_trl, run_trl_grpo
from fusedrl.bench.shapes import QWEN25_05B, TINY, model_dir, random_checkpoint

COLUMNS = [("side", "side"), ("iteration_s", "iteration s"), ("time_generate", "generate s"),
           ("response_tokens", "response tokens"), ("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB")]


SIDES = ["ours", "trl", "ours_lora", "trl_lora"]
DEFAULT_SHAPES = {("ppo", False): "32x4x128x256", ("ppo", True): "4x2x16x16",
                  ("grpo", False): "16x8x128x256", ("grpo", True): "2x4x16x16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny fp32 model on the CPU")
    p.add_argument("--algo", choices=["ppo", "grpo"], default="ppo",
                   help="ppo: against TRL's PPOTrainer; grpo: critic-free, against TRL's GRPOTrainer")
    p.add_argument("--sides", nargs="+", choices=SIDES,
                   help="default: ours and trl when trl is installed (tests/tools/peer_wheels.sh on the GPU machine), "
                        "else ours; with --lora also their _lora sides")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="rank of the LoRA sides ours_lora and trl_lora (0: none)")
    p.add_argument("--shape", default=None,
                   help="PROMPTSxSAMPLESxPROMPT_LENxNEW_TOKENS (default 32x4x128x256; grpo 16x8x128x256)")
    p.add_argument("--minibatches", type=int, default=4, help="PPO minibatches per epoch")
    p.add_argument("--micro", type=int, default=None, help="rows per forward/backward (default 16; quick 2)")
    p.add_argument("--tokens-per-microbatch", type=int, default=None,
                   help="ours: pack rows up to this many tokens per forward/backward (ppo.tokens_per_microbatch) "
                        "instead of --micro rows; TRL keeps --micro rows")
    p.add_argument("--out", default=None, help="JSON results path (default: bench/results/ppo[_quick].json)")
    p.add_argument("--trl-rollout-rows", type=int, default=0,
                   help="TRL PPO's local_rollout_forward_batch_size (0: its default, 64, halved while it "
                        "runs out of memory)")
    # Internal: one side in this process, its result to a JSON file (see main).
    p.add_argument("--run-side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--dirs", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sides is None:
        args.sides = ["ours", "trl"] if importlib.util.find_spec("trl") else ["ours"]
        if args.sides == ["ours"]:
            print("trl is not installed (pip install trl==0.29.1, or carry tests/tools/peer_wheels.sh's .whl): ours only")
        args.sides += [f"{side}_lora" for side in args.sides] if args.lora else []
    if any(side.endswith("_lora") for side in args.sides) and args.lora < 1:
        p.error(f"the sides {args.sides} include LoRA ones: give --lora RANK (>= 1)")
    dims = [int(x) for x in (args.shape or DEFAULT_SHAPES[args.algo, args.quick]).split("x")]
    args.shape = Shape(*dims, args.minibatches, args.micro or (2 if args.quick else 16), args.tokens_per_microbatch)
    if args.algo == "grpo" and args.shape.samples < 2:
        p.error(f"--algo grpo compares each prompt's samples: --shape needs SAMPLES >= 2, got {args.shape.samples}")
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / "results" / f"{args.algo}{'_quick' if args.quick else ''}.json")
    return args


def build_reward_model_dir(quick: bool, config=None, device: str | torch.device = "cpu") -> Path:
    """A random-init reward model (one-label sequence classification, fp32) on disk: of `config`'s
    architecture and shape (a transformers config), else Qwen2 at the benchmark's shape; its
    weights drawn on `device` (shapes.model_dir's reason)."""
    config = config or transformers.Qwen2Config(**(TINY if quick else QWEN25_05B))
    config.num_labels, config.pad_token_id = 1, PAD_ID
    torch.manual_seed(1)
    return random_checkpoint(
        lambda: transformers.AutoModelForSequenceClassification.from_config(config), device,
        "bench_ppo_rm_")


def run_ours(algo: str, shape: Shape, policy_dir: Path, rm_dir: Path, device: torch.device, lora: int) -> dict:
    from fusedrl.engine.config.lora import LoRAConfig
    from fusedrl.engine.model.hf_io import load_config
    from fusedrl.engine.inference.runner import kv_bytes_per_block
    from fusedrl.engine.stages.rollout.build import build_models, build_optimizers
    from fusedrl.engine.stages.rewards.combined import open_reward_functions
    from fusedrl.engine.config.ppo import (GRPOConfig, LoopConfig, UpdateConfig, PPOConfig, RewardConfig,
                                           RolloutConfig)
    from fusedrl.engine.stages.ppo.advantages import RunningMoments
    from fusedrl.engine.stages.rollout.answer_rows import sample_and_score
    from fusedrl.engine.stages.rollout.phase_timer import PhaseTimer
    from fusedrl.engine.stages.ppo.experience import ExperienceSettings, make_rollout
    from fusedrl.engine.stages.ppo.update import UpdateSettings, ppo_update
    from fusedrl.engine.train.precision import param_dtype, resolve_precision

    # What the process held before this side (another case's leftovers): not in its peak.
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    # The KV pool holds every row's prompt and response (no credit for prompt sharing), in the weights' dtype.
    dtype = param_dtype(resolve_precision("auto", device))
    model_config = load_config(policy_dir)
    blocks_per_row = -(-(shape.prompt_len + shape.new_tokens) // 16) + 1
    kv_bytes = shape.rows * blocks_per_row * kv_bytes_per_block(model_config, dtype, 16)
    rollout = RolloutConfig(prompts_per_iteration=shape.prompts, samples_per_prompt=shape.samples,
                            max_prompt_length=shape.prompt_len, max_new_tokens=shape.new_tokens,
                            ignore_eos=True, kv_cache_memory=kv_bytes, block_size=16)
    loop, minibatch = LoopConfig(iterations=2, device=device.type, progress=False), shape.rows // shape.minibatches
    adapters = LoRAConfig(rank=lora, alpha=2.0 * lora) if lora else LoRAConfig()
    micro = ({"tokens_per_microbatch": shape.tokens_per_micro} if shape.tokens_per_micro
             else {"microbatch_size": shape.micro})
    if algo == "ppo":
        cfg = PPOConfig(policy=str(policy_dir), reward_model=str(rm_dir), critic="separate", prompts_file="-",
                        output_dir="-", rollout=rollout, reward=RewardConfig(kl_coef=0.05), train=loop, lora=adapters,
                        ppo=UpdateConfig(epochs=1, minibatch_size=minibatch, vf_coef=0.1, **micro))
        tokenizer, rewards = build_tokenizer(model_config.eos_token_ids[0]), None
    else:
        cfg = GRPOConfig(policy=str(policy_dir), prompts_file="-", output_dir="-", rollout=rollout, train=loop,
                         lora=adapters, ppo=UpdateConfig(estimator="grpo", kl_loss_coef=GRPO_KL_COEF, vf_coef=0.0,
                                                         epochs=1, agg="token-mean", minibatch_size=minibatch, **micro))
        tokenizer = build_tokenizer(model_config.eos_token_ids[0], model_config.vocab_size)
        # In this process: the function lives in this script, which a worker would not import.
        rewards = open_reward_functions([even_token_share], None, "thread", 300.0)
    models = build_models(cfg, device, dtype, tokenizer, rewards)
    opts, _ = build_optimizers(models, cfg)
    prompts = make_prompts(shape, models.policy.config.vocab_size)
    clock = IterationClock(device, held)
    for iteration in range(2):
        clock.mark()
        timer = PhaseTimer(device)
        samples = sample_and_score(models, prompts, cfg.rollout, iteration, timer)
        rollout = make_rollout(models, samples, ExperienceSettings.of(cfg), cfg.reward.kl_coef, RunningMoments(),
                               timer).rollout
        with timer.phase("train"):
            ppo_update(models, opts, rollout, UpdateSettings.of(cfg), seed=iteration)
    clock.mark()
    return {**clock.result(), "response_tokens": int(rollout.mask.sum()), **timer.metrics(),
            "kv_pool_gib": models.actor.kv_pool_bytes / 2**30, **weight_sync(models.actor, device),
            "policy_parameters": sum(p.numel() for p in models.policy.parameters()),
            **planned_peak(cfg, device)}


def weight_sync(actor, device: torch.device) -> dict:
    """What making the trained weights the generator's costs, measured after the update: the time
    of the actor's `whole_weights()` (the step every rollout runs in: a gather under FSDP, a refill
    of persistent buffers, nothing on one process), and whether the generator's parameters are the
    policy's own storage (no copy made)."""
    harness.synchronize(device)
    start = time.perf_counter()
    with actor.whole_weights():
        harness.synchronize(device)
    seconds = time.perf_counter() - start
    shared = all(a.data_ptr() == b.data_ptr() for a, b in
                 zip(actor.llm.model.parameters(), actor.policy.parameters()))
    return {"weight_sync_s": seconds, "weights_shared": shared}


def planned_peak(cfg, device: torch.device) -> dict:
    """`fusedrl plan`'s per-device peak for this run's config on devices of this one's memory, as
    many as the run's ranks (one without torchrun; under it, one machine's) (plan_peak_gib), and
    the KV pool inside it (plan_kv_pool_gib: the config's bytes, capped at the rows' full length):
    the measured peak holds the pool the actor allocated (kv_pool_gib), so both sides count it."""
    from fusedrl.engine.plan.planner import plan_stage
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    plan = plan_stage(cfg, ranks, memory, device=device.type, advise=False)
    pool = plan.kv_pool.bytes if plan.kv_pool is not None else None
    return {"plan_peak_gib": plan.peak / 2**30,
            "plan_kv_pool_gib": None if pool is None else pool / 2**30}


def bench_device(quick: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")


def run_side(side: str, algo: str, shape: Shape, dirs, quick: bool, lora: int,
             trl_rollout_rows: int = 0) -> dict:
    device = bench_device(quick)
    policy_dir, rm_dir = (Path(d) for d in dirs)
    rank = lora if side.endswith("_lora") else 0
    if side.startswith("ours"):
        result = run_ours(algo, shape, policy_dir, rm_dir, device, rank)
    elif algo == "ppo":
        result = run_trl(shape, policy_dir, rm_dir, device, rank, trl_rollout_rows)
    else:
        result = run_trl_grpo(shape, policy_dir, device, rank)
    result["tokens_per_s"] = result["response_tokens"] / result["iteration_s"]
    return {"side": side, **result}


def run_in_this_process(side: str, args, dirs) -> dict:
    """One side here (--quick): a failure becomes its row's error, as a side process's does."""
    try:
        return run_side(side, args.algo, args.shape, dirs, args.quick, args.lora,
                        args.trl_rollout_rows)
    except Exception as error:  # noqa: BLE001 - the other sides still run and report
        traceback.print_exc()
        return {"side": side, "error": f"{type(error).__name__}: {error}"}


def run_in_subprocess(side: str, args, dirs, first_on_path: str | None = None) -> dict:
    """One side in a fresh process: its own peak memory and allocator, and a crash stays its own.
    first_on_path: a folder put first on the process's PYTHONPATH (the trl release its side runs,
    where another comes first here)."""
    env = None
    if first_on_path is not None:
        rest = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": first_on_path + (os.pathsep + rest if rest else "")}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--run-side", side, "--dirs", *map(str, dirs), "--result", str(result),
               "--shape", "x".join(map(str, dataclasses.astuple(args.shape)[:4])),
               "--minibatches", str(args.shape.minibatches), "--micro", str(args.shape.micro), "--algo", args.algo,
               "--lora", str(args.lora)]
        if args.shape.tokens_per_micro:
            cmd += ["--tokens-per-microbatch", str(args.shape.tokens_per_micro)]
        if args.trl_rollout_rows:
            cmd += ["--trl-rollout-rows", str(args.trl_rollout_rows)]
        proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            print(f"{side} failed:\n" + "\n".join(tail), file=sys.stderr)
            return {"side": side, "error": tail[-1] if tail else f"exit {proc.returncode}"}
        return json.loads(result.read_text())


def run_fitting(run, side: str, args, dirs) -> dict:
    """run(side, args, dirs), and for TRL's PPO side, where it runs out of the device's memory,
    again with half the rows per rollout forward (local_rollout_forward_batch_size: its default
    64 ran out of an H100's 80 GB at 16x4 and 32x4 rows of 128 + 256 tokens, bench/results/
    2026-11-23-h100), down to the micro-batch's rows; the result names the rows it ran."""
    result = run(side, args, dirs)
    rows = ROLLOUT_ROWS
    while (side.startswith("trl") and args.algo == "ppo" and "OutOfMemoryError" in
           result.get("error", "") and rows // 2 >= args.shape.micro):
        rows //= 2
        print(f"{side}: out of memory; again with {rows} rows per rollout forward",
              file=sys.stderr)
        args = copy.copy(args)
        args.trl_rollout_rows = rows
        result = run(side, args, dirs)
    return result


def compare(ours: dict, other: dict, key: str) -> dict:
    """Iteration-time speedup of `ours` over `other` and `other`'s peak memory over ours, when both ran."""
    if "iteration_s" not in ours or "iteration_s" not in other:
        return {}
    out = {f"speedup_{key}": other["iteration_s"] / ours["iteration_s"]}
    if ours["peak_gib"] and other["peak_gib"]:
        out[f"peak_memory_ratio_{key}"] = ours["peak_gib"] / other["peak_gib"]
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.run_side:
        with triton_compiles.record_from_env():  # a side of a recording bench run
            result = run_side(args.run_side, args.algo, args.shape, args.dirs, args.quick, args.lora,
                              args.trl_rollout_rows)
        harness.write_json(args.result, result)
        return
    device = bench_device(args.quick)
    policy_dir = model_dir("qwen2.5-0.5b", args.quick, 0, device=device).path
    # GRPO scores with a function: no reward model (its directory argument is the policy's, unused).
    dirs = (policy_dir, build_reward_model_dir(args.quick, device=device) if args.algo == "ppo"
            else policy_dir)
    try:
        run = run_in_this_process if args.quick else run_in_subprocess
        results = {side: run_fitting(run, side, args, dirs) for side in args.sides}
    finally:                                    # two fp32 checkpoints: 4 GB at the 0.5B shape
        for d in set(dirs):
            shutil.rmtree(d, ignore_errors=True)
    comparison = {}
    for key, (a, b) in {"vs_trl": ("ours", "trl"), "vs_trl_peft": ("ours_lora", "trl_lora"),
                        "lora_vs_full": ("ours_lora", "ours")}.items():
        comparison.update(compare(results.get(a, {}), results.get(b, {}), key))
    print(harness.format_table(list(results.values()), COLUMNS))
    print(json.dumps(comparison))
    payload = {"meta": harness.run_metadata(device), "algo": args.algo, "quick": args.quick, "lora": args.lora,
               "shape": dataclasses.asdict(args.shape),
               "results": results, **comparison}
    harness.write_json(args.out, payload)
    print(f"wrote {args.out}")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
