"""`fusedrl demo task=vision`: a tiny vision-language model learns to count coloured squares in
pictures. The task, pictures, tokenizer, image processor and data come from
engine/demos/vision_task.py; the model is a tiny random Qwen2.5-VL saved by transformers
(engine/model/vision/tiny.py's shapes).
  1. SFT on noisy demonstrations (a fraction answer a wrong count): the SFT policy reads the
     pictures but samples wrong counts too;
  2. GRPO with the program's check as a TRL-style reward function (`count_reward`, reading the
     rows' `answer` column), the pictures in the prompts, the vision tower frozen.
Accuracy is the program's judgement of answers sampled at the rollout temperature, on held-out
pictures.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config.demo import DemoConfig
from ..runs.run_dir import claim, releases_output_dir
from .run_plots import RunPlots
from .sorting import (TEMPERATURE, aligned, grpo_config, rl_figures, starts_over, time_rows,
                      written)
from .stage_clock import StageClock
from .vision_task import (build_vision_processor, count_reward, draw, is_correct,
                          task_messages, write_vision_data)

MAX_LENGTH = 24        # a prompt is 17 tokens (6 of them the picture's), an answer 2
MAX_NEW_TOKENS = 2     # the digit and EOS
MERGER_SCALE = 10.0
SFT_ROWS = 32          # demonstrations per SFT step


def build_vision_model(out_dir: Path, seed: int, processor) -> str:
    """A tiny random Qwen2.5-VL over the processor's vocabulary (its vision ids the tokenizer's),
    saved with the processor as a Hugging Face directory."""
    import transformers

    from ..model.vision.tiny import tiny_vlm_config

    tok = processor.tokenizer
    config = tiny_vlm_config("qwen2_5_vl", vocab_size=len(tok),
                             image_token_id=processor.image_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             max_position_embeddings=4 * MAX_LENGTH)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        # The patch merger's output 10x its random scale (about 10x the embeddings'): the image
        # tokens stand out in the residual stream from the start, and the tiny decoder learns to
        # read them in tens of steps instead of a hundred and more.
        for p in model.model.visual.merger.mlp[2].parameters():
            p.mul_(MERGER_SCALE)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def vision_accuracy(model, processor, tasks: list[dict], samples: int, seed: int) -> float:
    """Fraction of sampled answers (n per task, at the rollout temperature) that are the count."""
    from ..inference.llm import LLM
    from ..inference.sampling_params import SamplingParams

    prompts, images = [], []
    for task in tasks:
        ids, pixels = processor.encode(processor.render(task_messages(task), True),
                                       [draw(list(task["cells"]))])
        prompts.append(ids)
        images.append(pixels)
    llm = LLM(model, tokenizer=processor.tokenizer, kv_cache_memory=1 << 24,
              max_num_seqs=len(prompts) * samples, use_cuda_graphs=False)
    outs = llm.generate(prompts, SamplingParams(n=samples, temperature=TEMPERATURE,
                                                max_new_tokens=MAX_NEW_TOKENS, seed=seed),
                        images=images)
    judged = [is_correct(task["answer"], c.text) for task, out in zip(tasks, outs)
              for c in out.outputs]
    return sum(judged) / len(judged)


def train_vision_sft(cfg: DemoConfig, base: str, demonstrations: str, out: Path,
                     loop: dict) -> str:
    """The demo's SFT stage: cfg.sft_epochs over the demonstrations (a JSONL file of TRL rows with
    images) from the base model; returns the SFT policy's directory. loop: TrainConfig's device,
    precision, progress and resume."""
    from ..config.train import DataConfig, OptimConfig, SFTConfig, TrainConfig
    from ..stages.sft import train_sft

    return train_sft(SFTConfig(
        model=base, output_dir=str(out), seed=cfg.seed,
        data=DataConfig(train_file=demonstrations, tokens_per_batch=SFT_ROWS * 19,
                        max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH - 4, eval_fraction=0),
        optim=OptimConfig(lr=3e-3, warmup_steps=10, weight_decay=0.0),
        train=TrainConfig(epochs=cfg.sft_epochs, **loop, eval_every=0)))


@starts_over
@releases_output_dir
def run_vision_demo(cfg: DemoConfig, quiet: bool = False) -> dict:
    """SFT on noisy counting demonstrations with pictures, then GRPO with the program's reward;
    returns (and saves) the final table. cfg.output_dir is held as run_demo holds it
    (engine/demos/sorting.py)."""
    from ..model.hf_io import load_model
    from ..stages.ppo.trainer import train_ppo

    clock = StageClock()
    out = Path(cfg.output_dir)
    with clock.stage("setup"):
        claim(out, "demo", overwrite=cfg.overwrite)
        processor = build_vision_processor()
        data = write_vision_data(cfg.train_prompts, cfg.eval_prompts, cfg.demo_noise, cfg.seed,
                                 out / "data")
        base = build_vision_model(out / "base", cfg.seed, processor)
    loop = dict(device="cpu" if not torch.cuda.is_available() else None, precision=cfg.precision,
                progress=not quiet, resume=False)
    with RunPlots() as plots:
        with clock.stage("sft"):
            sft_dir = train_vision_sft(cfg, base, data["sft"], out / "sft", loop)
        plots.add(out / "sft")

        def accuracy(model) -> float:
            with clock.stage("evaluations"):
                return vision_accuracy(model, processor, data["held_out"], cfg.eval_samples,
                                       cfg.seed)

        sft_accuracy = accuracy(load_model(sft_dir))
        rl_cfg = grpo_config(cfg, out, sft_dir, data["prompts"], loop, minibatch_size=64,
                             max_new_tokens=MAX_NEW_TOKENS, max_prompt_length=MAX_LENGTH - 4)
        with clock.stage("rl"):
            rl_dir = train_ppo(rl_cfg, reward_fn=count_reward)
        plots.add(out / "rl")
        rl_accuracy = accuracy(load_model(rl_dir))
        table = {
            "task": "vision", "algo": "grpo",
            "sft_accuracy": sft_accuracy, "rl_accuracy": rl_accuracy,
            "rl_gain_points": 100 * (rl_accuracy - sft_accuracy),
            **rl_figures(out, clock),
        }
        return written(out, table, plots)


def format_vision_table(table: dict) -> str:
    rows = [("SFT accuracy (held-out, sampled)", f"{100 * table['sft_accuracy']:.1f}%"),
            ("GRPO accuracy (held-out, sampled)", f"{100 * table['rl_accuracy']:.1f}%"),
            ("GRPO gain over SFT", f"{table['rl_gain_points']:+.1f} points"),
            ("GRPO mean program reward", f"{table['rl_mean_score'] or 0:.3f}"),
            *time_rows(table, "GRPO")]
    return aligned(rows)
