"""`fusedrl demo`: the whole RLHF recipe on a task a program can check, with no downloads.

The task, data and tiny model come from engine/demos/sorting_task.py (sort the digits of the
prompt).
`algo=ppo` (the default, InstructGPT):
  1. SFT on noisy demonstrations (a fraction are wrong), so the SFT policy samples wrong answers
     too;
  2. a reward model on preference pairs (the correct answer over a corrupted one);
  3. PPO of the SFT policy against that reward model, with a frozen reference and a critic
     initialized from the reward model.
`algo=grpo` (critic-free, verifiable reward): the same SFT, then GRPO with the program's own check
as the reward (1 for a correct answer, 0 otherwise): no reward model, no critic.
Accuracy is judged by the program (is the response the sorted prompt?), never by a reward model,
on held-out prompts, sampling at the rollout temperature.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable

import torch

from ...kernels import compile_ahead
from ..config.demo import DemoConfig
from ..runs.durable import write_text_atomic
from ..errors import Interrupted
from ..runs.run_dir import claim, releases_output_dir
from ..train.loop import RunInterrupted
from .run_plots import RunPlots
from .sorting_task import build_base_model, build_tokenizer, is_correct, write_data
from .stage_clock import StageClock

TEMPERATURE = 1.0
# The Triton launches the demo makes on a GPU (tests/tools/record_demo_launches.py writes it),
# compiled in parallel while the demo sets up (kernels/ahead_of_time.py).
DEMO_LAUNCHES = Path(__file__).with_name("demo_launches.json")
# The RL stage's peak learning rate: full fine-tuning, and LoRA, whose low-rank updates (B starts
# at zero) need a larger step to move the policy as far in as many iterations.
RL_LR, RL_LORA_LR = 2e-4, 2e-3


def starts_over(demo: Callable) -> Callable:
    """Decorates a demo's entry point: a stage the demo runs stopped by a signal says how to rerun
    the demo. Its stages run with train.resume=false (a demo is claimed whole and replaced on a
    rerun, never continued), so the stage's own advice, the same command with train.resume=true,
    is not an option of `fusedrl demo`."""
    @functools.wraps(demo)
    def run(cfg, *args, **kwargs):
        try:
            return demo(cfg, *args, **kwargs)
        except RunInterrupted as stop:
            raise Interrupted(f"{stop.stopped}; a demo does not resume: rerun it with "
                              "overwrite=true to start it again", stop.exit_code - 128) from stop
    return run


def sampled_accuracy(model, tokenizer, prompts: list[str], samples: int, temperature: float,
                     seed: int) -> float:
    """Fraction of sampled responses (n per prompt) that the program judges correct."""
    from ..inference.llm import LLM
    from ..inference.sampling_params import SamplingParams

    llm = LLM(model, tokenizer=tokenizer, kv_cache_memory=1 << 24,
              max_num_seqs=len(prompts) * samples, use_cuda_graphs=False)
    outs = llm.generate(prompts,
                        SamplingParams(n=samples, temperature=temperature, max_new_tokens=12,
                                       seed=seed))
    judged = [is_correct(p, c.text) for p, out in zip(prompts, outs) for c in out.outputs]
    return sum(judged) / len(judged)


def program_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The verifiable reward of `algo=grpo`: 1.0 for a correctly sorted answer, else 0.0."""
    return [float(is_correct(p, r)) for p, r in zip(prompts, responses)]


def last_metric(run_dir: str, kind: str, key: str):
    from ..train.runlog import read_metrics

    rows = [r for r in read_metrics(run_dir) if r["kind"] == kind and key in r]
    return rows[-1][key] if rows else None


def rl_figures(out: Path, clock: StageClock) -> dict:
    """The RL run's (out/rl) last mean score and KL, None where never logged, and the demo's wall
    seconds and seconds by stage (`clock`, made as the demo began)."""
    return {"rl_mean_score": last_metric(str(out / "rl"), "train", "score_mean"),
            "rl_kl": last_metric(str(out / "rl"), "train", "kl"),
            "seconds": clock.total(), "stage_seconds": dict(clock.seconds)}


def written(out: Path, table: dict, plots: RunPlots) -> dict:
    """`table` written to out/results.json (whole or not at all), then the PNGs of the runs added
    to `plots` listed in it once drawn."""
    write_text_atomic(out / "results.json", json.dumps(table, indent=2))
    table["plots"] = plots.paths()
    return table


def aligned(rows: list[tuple[str, str]]) -> str:
    """(label, value) rows as lines, the values in one column."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def rl_training(cfg: DemoConfig, min_lr_ratio: float = 1.0, lr_scale: float = 1.0) -> dict:
    """The RL stage's optimizer (peak rate RL_LR or RL_LORA_LR times lr_scale, decaying to
    min_lr_ratio x its peak; 1.0: constant) and adapters (cfg.lora_rank > 0)."""
    from ..config.lora import LoRAConfig
    from ..config.train import OptimConfig

    lr = (RL_LORA_LR if cfg.lora_rank else RL_LR) * lr_scale
    targets = {"target_modules": "q_proj,k_proj,v_proj,o_proj"} if cfg.arch == "qwen3_moe" else {}
    return {"optim": OptimConfig(lr=lr, max_grad_norm=1.0, min_lr_ratio=min_lr_ratio),
            "lora": LoRAConfig(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank, **targets)
            if cfg.lora_rank else LoRAConfig()}


def run_ppo_stage(cfg: DemoConfig, out: Path, data: dict, sft_dir: Path, loop: dict,
                  evaluate, plots: RunPlots, clock: StageClock) -> Path:
    """RM on the preference pairs (its curves to `plots`), then PPO against it, timed as the
    stages "rm" and "rl" of `clock`; returns the PPO policy's directory."""
    from ..config.ppo import LoopConfig, PPOConfig, RewardConfig, RolloutConfig, UpdateConfig
    from ..config.train import DataConfig, OptimConfig, RMConfig, TrainConfig
    from ..stages.ppo.trainer import train_ppo
    from ..stages.rm import train_rm

    # Steps of 2,048 tokens (~85 pairs): 249 steps over 3 epochs where 512 took 993, for the same
    # held-out pairwise accuracy and PPO gain (seeds 0-2, fp32: 98.5 / 100 / 98.2% and +35.0 /
    # +35.8 / +31.2 points, against 98.5 / 100 / 99.5% and +34.8 / +36.5 / +31.7). On a GPU a step
    # of this tiny model should cost its launches and host work more than its tokens (expected,
    # not yet timed there); on 2 CPU cores the stage took 15.5 s instead of 27.5. 4,096 tokens
    # (123 steps) lost accuracy (96.2%, +29.0 for seed 0).
    rm_cfg = RMConfig(
        model=str(sft_dir), output_dir=str(out / "rm"), seed=cfg.seed,
        data=DataConfig(train_file=data["rm"], tokens_per_batch=2048, max_length=16,
                        max_prompt_length=8, eval_fraction=0.05),
        optim=OptimConfig(lr=2e-3, warmup_steps=5),
        train=TrainConfig(epochs=cfg.rm_epochs, **loop))
    with clock.stage("rm"):
        rm_dir = train_rm(rm_cfg)
    plots.add(out / "rm")
    ppo_cfg = PPOConfig(
        policy=str(sft_dir), reward_model=str(rm_dir), prompts_file=data["prompts"],
        output_dir=str(out / "rl"), seed=cfg.seed,
        rollout=RolloutConfig(prompts_per_iteration=cfg.rl_prompts, samples_per_prompt=4,
                              max_new_tokens=12, temperature=TEMPERATURE, kv_cache_memory=1 << 24),
        # Two updates an iteration (minibatches of 64 rows, all of a default iteration's, over two
        # epochs) at twice GRPO's rate: the gains of four updates of 32 at its rate for half the
        # steps (seeds 0-2, fp32: +35.5 / +39.0 / +31.5 points against +35.0 / +35.8 / +31.2; at
        # 1.5x the rate +35.5 / +35.5 / +30.2).
        ppo=UpdateConfig(epochs=2, minibatch_size=64, vf_coef=0.1, gamma=1.0, lam=0.95),
        # Raw reward-model scores, not normalized ones: the critic starts as a copy of the reward
        # model, so its values are in the scores' own units. Normalized rewards (std 1 against the
        # scores' ~10) left the critic predicting the wrong scale for the first ~30 of the 100
        # iterations (explained variance -8.5 at iteration 10, accuracy flat); seed 0 fp32 gains
        # +31.0 points with raw scores, +24.5 with normalized ones. kl_coef 1.0 keeps the KL's
        # weight against scores of std ~10 what 0.1 is against normalized ones.
        reward=RewardConfig(kl_coef=1.0, normalize=False),
        # The rate decays (cosine to 0.1x): at a constant one the held-out accuracy swung by 5-10
        # points between evaluations to the end (seed 0 bf16-mixed: 90.2% at iteration 80, 80.8% at
        # 100); decaying, it settles (fp32: 85.2 -> 90.8% over the last 50). Larger steps exploited
        # the reward model.
        train=LoopConfig(iterations=cfg.rl_iterations, log_every=10, **loop),
        **rl_training(cfg, min_lr_ratio=0.1, lr_scale=2.0))
    with clock.stage("rl"):
        return train_ppo(ppo_cfg, evaluate=evaluate)


def grpo_config(cfg: DemoConfig, out: Path, sft_dir: Path, prompts_file: str, loop: dict,
                minibatch_size: int = 32, **rollout):
    """The demos' GRPO stage from the SFT policy at `sft_dir` into out/rl: cfg.rl_prompts prompts
    x 8 samples an iteration at TEMPERATURE, one epoch, the KL as a loss term (0.001), no critic;
    `rollout`: the task's own RolloutConfig fields (its lengths, tools, ...)."""
    from ..config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig

    return GRPOConfig(
        policy=str(sft_dir), prompts_file=prompts_file, output_dir=str(out / "rl"), seed=cfg.seed,
        rollout=RolloutConfig(prompts_per_iteration=cfg.rl_prompts, samples_per_prompt=8,
                              temperature=TEMPERATURE, kv_cache_memory=1 << 24, **rollout),
        ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=minibatch_size, vf_coef=0.0,
                         kl_loss_coef=0.001),
        train=LoopConfig(iterations=cfg.rl_iterations, log_every=10, **loop), **rl_training(cfg))


def run_grpo_stage(cfg: DemoConfig, out: Path, data: dict, sft_dir: Path, loop: dict,
                   evaluate, clock: StageClock) -> Path:
    """GRPO with the program's check as the reward, timed as the stage "rl" of `clock`; returns
    the policy's directory."""
    from ..stages.ppo.trainer import train_ppo

    config = grpo_config(cfg, out, sft_dir, data["prompts"], loop, max_new_tokens=12,
                         dynamic_sampling=True)
    with clock.stage("rl"):
        return train_ppo(config, reward_fn=program_reward, evaluate=evaluate)


@starts_over
@releases_output_dir
def run_demo(cfg: DemoConfig, quiet: bool = False) -> dict:
    """SFT, then PPO (with a reward model) or GRPO (with the program's reward) on the sorting task;
    returns (and saves) the final table. cfg.output_dir is held (runs/run_dir.py) and replaced
    only when it is an earlier demo and cfg.overwrite is set."""
    from ..config.train import DataConfig, OptimConfig, SFTConfig, TrainConfig
    from ..model.hf_io import load_model
    from ..stages.sft import train_sft

    clock = StageClock()
    out = Path(cfg.output_dir)
    with clock.stage("setup"):
        claim(out, "demo", overwrite=cfg.overwrite)
        ahead = compile_ahead(json.loads(DEMO_LAUNCHES.read_text()))
        try:
            data = write_data(cfg, out / "data")
            tokenizer = build_tokenizer()
            base = build_base_model(out / "base", cfg.seed, cfg.arch)
        finally:
            compiled, failed = ahead.wait()
    loop = dict(device="cpu" if not torch.cuda.is_available() else None, precision=cfg.precision,
                progress=not quiet, resume=False)
    if failed:
        print(f"fusedrl demo: {len(failed)} of {compiled + len(failed)} Triton kernels not "
              f"compiled ahead (they compile at their first launch): {failed[0]}", file=sys.stderr)

    with RunPlots() as plots:
        # Steps of 512 tokens at 4e-3: 168 steps over 4 epochs where 256 at 3e-3 took 332, for the
        # same accuracies after PPO (seeds 0-2, fp32: 89.2 / 88.8 / 81.0% against 86.8 / 90.0 /
        # 78.0%; bf16-mixed: 92.5 / 89.8 / 81.8% against 92.5 / 86.2 / 78.8%). Steps of 1,024
        # left SFT and PPO 5-10 points lower (at 6e-3) or seed 0's gain at +25.0 (at 3e-3).
        sft_cfg = SFTConfig(
            model=base, output_dir=str(out / "sft"), seed=cfg.seed,
            data=DataConfig(train_file=data["sft"], tokens_per_batch=512, max_length=16,
                            max_prompt_length=8, eval_fraction=0.05),
            optim=OptimConfig(lr=4e-3, warmup_steps=10, weight_decay=0.0),
            train=TrainConfig(epochs=cfg.sft_epochs, eval_every=0, **loop))
        with clock.stage("sft"):
            sft_dir = train_sft(sft_cfg)
        plots.add(out / "sft")

        def accuracy(model) -> float:
            # every evaluation is its own stage, those PPO runs between its iterations too
            with clock.stage("evaluations"):
                return sampled_accuracy(model, tokenizer, data["held_out"], cfg.eval_samples,
                                        TEMPERATURE, cfg.seed)

        sft_accuracy = accuracy(load_model(sft_dir))
        evaluate = lambda models: {"accuracy": accuracy(models.policy)}  # noqa: E731
        rl_dir = (run_grpo_stage(cfg, out, data, sft_dir, loop, evaluate, clock)
                  if cfg.algo == "grpo"
                  else run_ppo_stage(cfg, out, data, sft_dir, loop, evaluate, plots, clock))
        plots.add(out / "rl")
        rl_accuracy = accuracy(load_model(rl_dir))
        table = {
            "algo": cfg.algo,
            "sft_accuracy": sft_accuracy,
            "rm_heldout_accuracy": last_metric(str(out / "rm"), "eval", "accuracy")
            if cfg.algo == "ppo" else None,
            "rl_accuracy": rl_accuracy,
            "rl_gain_points": 100 * (rl_accuracy - sft_accuracy),
            **rl_figures(out, clock),
        }
        return written(out, table, plots)


def _shown(value, template: str) -> str:
    return "-" if value is None else template.format(value)  # None: never measured (e.g. skipped)


def format_table(table: dict) -> str:
    algo = table["algo"].upper()
    score = "reward-model score" if table["algo"] == "ppo" else "program reward"
    rm = table["rm_heldout_accuracy"]
    rows = [("SFT accuracy (held-out, sampled)", f"{100 * table['sft_accuracy']:.1f}%"),
            ("RM held-out pairwise accuracy", _shown(None if rm is None else 100 * rm, "{:.1f}%")),
            (f"{algo} accuracy (held-out, sampled)", f"{100 * table['rl_accuracy']:.1f}%"),
            (f"{algo} gain over SFT", f"{table['rl_gain_points']:+.1f} points"),
            (f"{algo} mean {score}", _shown(table["rl_mean_score"], "{:.3f}")),
            (f"{algo} KL to the SFT policy", _shown(table["rl_kl"], "{:.3f}")),
            *time_rows(table, algo)]
    return aligned(rows)


STAGE_NAMES = {"setup": "setup", "sft": "SFT", "evaluations": "evaluations", "rm": "RM"}


def time_rows(table: dict, algo: str) -> list[tuple[str, str]]:
    """A demo table's last rows: its wall time and its seconds by stage (`rl_figures`')."""
    return [("wall time", f"{table['seconds']:.0f} s"),
            ("time by stage", by_stage(table["stage_seconds"], table["seconds"], algo))]


def by_stage(seconds: dict, total: float, algo: str) -> str:
    """`seconds` by stage (StageClock's) on one line, the stage "rl" named `algo` (PPO, GRPO),
    then what of the `total` no stage holds (loading models, writing the table): "setup 1.2 s,
    SFT 7.0 s, ..., other 0.3 s"."""
    names = {**STAGE_NAMES, "rl": algo}
    parts = [f"{names[stage]} {s:.1f} s" for stage, s in seconds.items()]
    return ", ".join(parts + [f"other {total - sum(seconds.values()):.1f} s"])
