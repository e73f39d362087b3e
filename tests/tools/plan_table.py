"""The memory plan of Qwen2.5 models on one node, from their config.json alone (no weights, no GPU).

    python tests/tools/plan_table.py [--gpus 8] [--gpu-memory 80GB] [--sizes 7B,14B,32B,72B] [--lora-rank 64]
                               [--set train.gradient_checkpointing=true ...]

Writes each model's config.json (the published Qwen2.5 Instruct shapes) into a temporary directory,
runs `fusedrl plan --json` for PPO (a reward model of the same size, a separate critic; LoRA: on the
policy and the critic) and GRPO (a reward function), full and LoRA, each with the --set options and
the stages' defaults otherwise, and prints the README's Markdown table: the peak per-GPU bytes, its
phase, and whether it fits.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# The fields of the published config.json files (Qwen/Qwen2.5-*-Instruct) that shape memory.
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "tie_word_embeddings")
QWEN25 = {size: dict(zip(FIELDS, values)) for size, values in {
    "0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "7B": (3584, 18944, 28, 28, 4, 152064, False),
    "14B": (5120, 13824, 48, 40, 8, 152064, False),
    "32B": (5120, 27648, 64, 40, 8, 152064, False),
    "72B": (8192, 29568, 80, 64, 8, 152064, False),
}.items()}
COMMON = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
              max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
              use_sliding_window=False, max_window_layers=28, bos_token_id=151643, eos_token_id=151645,
              torch_dtype="bfloat16", attention_dropout=0.0, initializer_range=0.02, use_cache=True)


def write_config(root: Path, size: str) -> Path:
    """root/Qwen2.5-SIZE/config.json; returns the directory."""
    directory = root / f"Qwen2.5-{size}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**COMMON, **QWEN25[size]}, indent=2))
    return directory


def plan_json(stage: str, model_dir: Path, *overrides: str, gpus: int = 8, gpu_memory: str = "80GB") -> dict:
    """`fusedrl plan STAGE ... --json` in a fresh interpreter, as a user runs it."""
    key = "model" if stage in ("sft", "rm") else "policy"
    cmd = [sys.executable, "-m", "fusedrl.engine.cli", "plan", stage, f"{key}={model_dir}", *overrides,
           "--gpus", str(gpus), "--gpu-memory", gpu_memory, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def cell(plan: dict) -> str:
    return f"{'fits' if plan['fits'] else '**no**'}: {plan['peak_bytes'] / 1e9:.0f} GB ({plan['peak_phase']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-memory", default="80GB")
    parser.add_argument("--sizes", default="7B,14B,32B,72B")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--set", nargs="*", default=["train.gradient_checkpointing=true"], metavar="key=value",
                        help="options of every plan (default: train.gradient_checkpointing=true)")
    args = parser.parse_args()
    lora = f"lora.rank={args.lora_rank}"
    columns = [("PPO", "ppo", ()), ("PPO, optimizer offloaded", "ppo", ("train.optimizer_offload=true",)),
               (f"PPO, LoRA r={args.lora_rank}", "ppo", (lora, f"critic_lora.rank={args.lora_rank}")),
               ("GRPO", "grpo", ()), (f"GRPO, LoRA r={args.lora_rank}", "grpo", (lora,))]
    print(f"| model ({args.gpus} x {args.gpu_memory}) | " + " | ".join(name for name, *_ in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model = write_config(Path(tmp), size)
            cells = []
            for _, stage, extra in columns:
                reward = (f"reward_model={model}",) if stage == "ppo" else ("reward_fn=rewards:score",)
                cells.append(cell(plan_json(stage, model, *reward, *args.set, *extra, gpus=args.gpus,
                                            gpu_memory=args.gpu_memory)))
            print(f"| Qwen2.5-{size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
