"""One PPO iteration of our stage: time split, tokens/s per phase and peak memory per phase.

A random-init Qwen2.5-0.5B-shaped policy (and the same weights as the frozen reference), a shared
value head, a reward function on token ids, fp32 master weights with bf16 autocast on the GPU. The
first iteration warms up (CUDA graphs, allocator); the second is measured. `--quick` runs a tiny
model on the CPU to check the script itself.

The side-by-side with TRL's PPO trainer (the issue's comparison) is not here yet: TRL 1.x ships no
PPO trainer, so it needs an older TRL that works with the GPU image's transformers, carried as
wheels. Until then this reports our numbers alone and says so in its JSON.

    python bench/bench_ppo.py                 # GPU: 64 prompts x 4 samples, 128 prompt + 256 new tokens
    python bench/bench_ppo.py --quick         # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_sft import build_model_dir  # noqa: E402
from engine import load_model  # noqa: E402
from engine.actor import HybridActor  # noqa: E402
from engine.critic import shared_value_head  # noqa: E402
from engine.ppo import build_optimizers  # noqa: E402
from engine.ppo_config import LoopConfig, LossConfig, PPOConfig, RolloutConfig  # noqa: E402
from engine.ppo_core import RunningMoments  # noqa: E402
from engine.ppo_step import PhaseTimer, PPOModels, make_rollout, ppo_update  # noqa: E402
from engine.trainer import autocast_for  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny fp32 model on the CPU")
    p.add_argument("--out", default=None, help="JSON results path (default: bench/results/ppo[_quick].json)")
    args = p.parse_args()
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / "results" / ("ppo_quick.json" if args.quick else "ppo.json"))
    return args


def even_token_fraction(prompts, responses):
    """A reward function on token ids (no reward model to load): the fraction of even ids."""
    return torch.tensor([sum(t % 2 == 0 for t in r) / len(r) for r in responses])


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    prompts_n, samples, prompt_len, new_tokens = (4, 2, 16, 16) if args.quick else (64, 4, 128, 256)
    model_dir = build_model_dir(args.quick)
    cfg = PPOConfig(policy=str(model_dir), prompts_file="-", output_dir="-", reward_fn="-", critic="shared",
                    rollout=RolloutConfig(prompts_per_iteration=prompts_n, samples_per_prompt=samples,
                                          max_new_tokens=new_tokens, kv_cache_memory=(1 << 24) if args.quick else 8 << 30),
                    ppo=LossConfig(epochs=1, minibatch_size=prompts_n * samples // 4),
                    train=LoopConfig(iterations=2))
    policy = load_model(model_dir, dtype="float32", device=device)
    reference = load_model(model_dir, dtype="float32", device=device).eval().requires_grad_(False)
    # ignore_eos-free generation of a random model stops at random EOS draws: fine for timing.
    actor = HybridActor(policy, kv_cache_memory=cfg.rollout.kv_cache_memory, max_num_seqs=prompts_n * samples)
    models = PPOModels(policy, reference, actor, None, shared_value_head(policy), even_token_fraction,
                       autocast=lambda: autocast_for(device, True))
    opts, _ = build_optimizers(models, cfg)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, policy.config.vocab_size, (prompts_n, prompt_len), generator=g).tolist()
    for iteration in range(2):                       # the first warms up
        timer = PhaseTimer(device)
        rollout, metrics = make_rollout(models, prompts, cfg, 0.05, RunningMoments(), iteration, timer)
        with timer.phase("train"):
            metrics.update(ppo_update(models, opts, rollout, cfg, seed=iteration))
    tokens = int(rollout.mask.sum())
    total = sum(timer.seconds.values())
    result = {"shape": f"{prompts_n}x{samples} rows, prompt {prompt_len}, up to {new_tokens} new",
              "response_tokens": tokens, "iteration_s": total, "tokens_per_s": tokens / total,
              **timer.metrics(), "trl": "not run (see the module docstring)"}
    print(harness.format_table([result], [(k, k) for k in result]))
    payload = {"meta": harness.run_metadata(device), "results": [result]}
    harness.write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
