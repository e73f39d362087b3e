"""GRPO with images on a task no test contains: a tiny vision-language model learns to count only
the red squares in a picture ("how many red squares ?"), where the demo and the tests count every
square. The pictures, tokenizer, image processor and tiny Qwen2.5-VL are the vision demo's
(engine/demos/vision_task.py, vision.py); the task's answers, its question and one more word are
this script's. SFT on noisy demonstrations (the demo's stage), then `fusedrl grpo` run as a user
runs it: the command, a JSONL file with an `images` column and the `answer` column, and a TRL-style
reward function named by `module:function`. Held-out accuracy (sampled answers judged by the
program) before and after GRPO, with the command's seconds, on whatever device runs it.

    python bench/bench_vlm_grpo.py --seeds 0 1 2 --out vlm_grpo.json   # ~1.5 minutes a seed, 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusedrl.bench import harness
from fusedrl.engine.config.demo import DemoConfig
from fusedrl.engine.demos.sorting import RL_LR, TEMPERATURE
from fusedrl.engine.demos.vision import (MAX_LENGTH, MAX_NEW_TOKENS, build_vision_model,
                                         train_vision_sft, vision_accuracy)
from fusedrl.engine.demos.vision_task import WORDS, build_vision_processor, write_vision_data
from fusedrl.engine.model.hf_io import load_model

COUNTED = frozenset({"red"})
QUESTION = "how many red squares ?"


def grpo_command(policy: str, prompts: str, out: Path, cfg: DemoConfig, device: str) -> list[str]:
    """The `fusedrl grpo` command line of the demo's GRPO recipe on these prompts."""
    return [sys.executable, "-m", "fusedrl.engine.cli", "grpo", f"policy={policy}",
            f"prompts_file={prompts}", f"output_dir={out}", f"seed={cfg.seed}",
            "reward_fn=fusedrl.engine.demos.vision_task:count_reward",
            f"rollout.prompts_per_iteration={cfg.rl_prompts}", "rollout.samples_per_prompt=8",
            f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"rollout.temperature={TEMPERATURE}",
            f"rollout.kv_cache_memory={1 << 24}", f"rollout.max_prompt_length={MAX_LENGTH - 4}",
            "ppo.estimator=grpo", "ppo.epochs=1", "ppo.minibatch_size=64", "ppo.vf_coef=0",
            "ppo.kl_loss_coef=0.001", f"train.iterations={cfg.rl_iterations}",
            "train.log_every=10", f"train.device={device}", f"train.precision={cfg.precision}",
            "train.progress=false", f"optim.lr={RL_LR}", "optim.max_grad_norm=1.0"]


def measure(cfg: DemoConfig, root: Path, device: str) -> dict:
    """SFT, then `fusedrl grpo` in a process of its own; the held-out accuracy after each."""
    processor = build_vision_processor(WORDS + ["red"])
    data = write_vision_data(cfg.train_prompts, cfg.eval_prompts, cfg.demo_noise, cfg.seed,
                             root / "data", counted=COUNTED, question=QUESTION)
    base = build_vision_model(root / "base", cfg.seed, processor)
    loop = dict(device=device, precision=cfg.precision, progress=False, resume=False)
    start = time.perf_counter()
    sft_dir = train_vision_sft(cfg, base, data["sft"], root / "sft", loop)
    sft_s = time.perf_counter() - start

    def accuracy(policy: str) -> float:
        return vision_accuracy(load_model(policy), processor, data["held_out"], cfg.eval_samples,
                               cfg.seed)

    sft_accuracy = accuracy(sft_dir)
    start = time.perf_counter()
    subprocess.run(grpo_command(sft_dir, data["prompts"], root / "rl", cfg, device), check=True,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    grpo_s = time.perf_counter() - start
    rl_accuracy = accuracy(str(root / "rl" / "final"))
    return {"task": QUESTION, "held_out_pictures": cfg.eval_prompts,
            "samples_per_picture": cfg.eval_samples, "train_pictures": cfg.train_prompts,
            "demo_noise": cfg.demo_noise, "grpo_iterations": cfg.rl_iterations,
            "sft_accuracy": sft_accuracy, "grpo_accuracy": rl_accuracy,
            "gain_points": 100 * (rl_accuracy - sft_accuracy),
            "sft_seconds": round(sft_s, 1), "grpo_command_seconds": round(grpo_s, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (data, model init and every stage)")
    p.add_argument("--rl-iterations", type=int, default=None,
                   help="GRPO iterations (default: the vision demo's)")
    p.add_argument("--out", default=None, help="JSON results path")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    for seed in args.seeds:
        cfg = DemoConfig(task="vision", seed=seed, rl_iterations=args.rl_iterations)
        with tempfile.TemporaryDirectory(prefix="fusedrl-vlm-grpo-") as tmp:
            runs.append({"seed": seed, **measure(cfg, Path(tmp), device)})
        print(runs[-1])
    gains = [r["gain_points"] for r in runs]
    print(f"gain over SFT: {sum(gains) / len(gains):+.1f} points on average over {len(runs)} seeds")
    if args.out:
        harness.write_json(args.out, {"meta": harness.run_metadata(torch.device(device)),
                                      "runs": runs,
                                      "mean_gain_points": sum(gains) / len(gains)})


if __name__ == "__main__":
    main()
