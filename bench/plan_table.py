"""The memory plan of Qwen2.5 models on one node, from their config.json alone (no weights, no GPU).

    python bench/plan_table.py [--gpus 8] [--gpu-memory 80GB] [--sizes 7B,14B,32B,72B] [--lora-rank 64]

Writes each model's config.json (the published Qwen2.5 Instruct shapes) into a temporary directory,
runs `fusedrl plan --json` for PPO (a reward model of the same size, a separate critic) and GRPO
(a reward function), full and LoRA, and prints the README's Markdown table: the peak per-GPU bytes,
its phase, and whether it fits.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# The fields of the published config.json files (Qwen/Qwen2.5-*-Instruct) that shape memory.
QWEN25 = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
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
    args = parser.parse_args()
    lora = f"lora.rank={args.lora_rank}"
    columns = [("PPO", "ppo", ()), ("PPO, optimizer offloaded", "ppo", ("train.optimizer_offload=true",)),
               (f"PPO, LoRA r={args.lora_rank}", "ppo", (lora,)), ("GRPO", "grpo", ()),
               (f"GRPO, LoRA r={args.lora_rank}", "grpo", (lora,))]
    print(f"| model ({args.gpus} x {args.gpu_memory}) | " + " | ".join(name for name, *_ in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model = write_config(Path(tmp), size)
            cells = []
            for _, stage, extra in columns:
                reward = (f"reward_model={model}",) if stage == "ppo" else ("reward_fn=rewards:score",)
                cells.append(cell(plan_json(stage, model, *reward, *extra, gpus=args.gpus,
                                            gpu_memory=args.gpu_memory)))
            print(f"| Qwen2.5-{size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
