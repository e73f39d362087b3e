"""`fusedrl demo task=tool`: a tiny model that cannot add multi-digit numbers learns to call a
calculator tool. The task, data, tokenizer and tool come from engine/demos/tool_task.py.
  1. SFT on conversations (data/chat.py's tool_calls rows) of which cfg.tool_calls call the `add`
     tool and the others answer at once: the SFT policy calls it now and then, and its direct
     answers are mostly wrong;
  2. GRPO with the tool (rollout.tools: multi-turn trajectories through the engine's one loop, the
     tool's results as `tool` messages, the loss on the model's tokens only) and the program's
     check of the final answer as the reward.
Accuracy is the program's judgement of the final answer of trajectories sampled with the tool at
the rollout temperature, on held-out questions.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config.demo import DemoConfig
from ..runs.run_dir import claim, releases_output_dir
from .run_plots import RunPlots
from .sorting import (TEMPERATURE, aligned, grpo_config, rl_figures, starts_over, time_rows,
                      written)
from .sorting_task import build_base_model
from .stage_clock import StageClock
from .tool_task import (add, build_tokenizer, final_answer, is_correct, tool_reward,
                             write_tool_data)

TOOLS = [f"{add.__module__}:{add.__name__}"]
MAX_TURNS = 2          # the call, then the answer
MAX_NEW_TOKENS = 32    # a turn: the tool call is 24 tokens
MAX_POSITIONS = 128    # the longest conversation is 68 tokens


def tool_accuracy(model, tokenizer, prompts: list[str], samples: int, seed: int) -> dict:
    """{"accuracy": fraction of sampled trajectories (n per prompt) whose final answer is right,
    "tool_rate": fraction that called the tool}, the trajectories run with the tool."""
    from ..agents import (AgentLimits, ChatRenderer, ToolEnvironment, parse_hermes, run_agents,
                          tool_schema)
    from ..inference.llm import LLM
    from ..inference.sampling_params import SamplingParams

    llm = LLM(model, tokenizer=tokenizer, kv_cache_memory=1 << 24,
              max_num_seqs=len(prompts) * samples, use_cuda_graphs=False)
    trajectories = run_agents(
        llm, ChatRenderer(tokenizer, [tool_schema(add)]),
        lambda row: ToolEnvironment({"add": add}, parse_hermes, row["prompt"]),
        [{"prompt": p} for p in prompts],
        SamplingParams(n=samples, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS,
                       seed=seed), AgentLimits(MAX_TURNS, None, env_timeout_s=30.0))
    # The reward's judgement (tool_reward) of the same messages the trainer hands it.
    judged = [is_correct(prompts[i // samples], final_answer(t.messages[t.opening:]))
              for i, t in enumerate(trajectories)]
    return {"accuracy": sum(judged) / len(judged),
            "tool_rate": sum(t.tokens.turns > 1 for t in trajectories) / len(trajectories)}


@starts_over
@releases_output_dir
def run_tool_demo(cfg: DemoConfig, quiet: bool = False) -> dict:
    """SFT on tool-use conversations, then GRPO with the tool; returns (and saves) the final table.
    cfg.output_dir is held as run_demo holds it (engine/demos/sorting.py)."""
    from ..agents import tool_schema
    from ..config.train import DataConfig, OptimConfig, SFTConfig, TrainConfig
    from ..model.hf_io import load_model
    from ..stages.ppo.trainer import train_ppo
    from ..stages.sft import train_sft

    clock = StageClock()
    out = Path(cfg.output_dir)
    with clock.stage("setup"):
        claim(out, "demo", overwrite=cfg.overwrite)
        tokenizer = build_tokenizer()
        data = write_tool_data(cfg, out / "data", [tool_schema(add)])
        base = build_base_model(out / "base", cfg.seed, cfg.arch, tokenizer, MAX_POSITIONS)
    loop = dict(device="cpu" if not torch.cuda.is_available() else None, precision=cfg.precision,
                progress=not quiet, resume=False)

    with RunPlots() as plots:
        sft_cfg = SFTConfig(
            model=base, output_dir=str(out / "sft"), seed=cfg.seed,
            data=DataConfig(train_file=data["sft"], tokens_per_batch=512, max_length=MAX_POSITIONS,
                            max_prompt_length=MAX_POSITIONS // 2, eval_fraction=0.05),
            optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0),
            train=TrainConfig(epochs=cfg.sft_epochs, eval_every=0, **loop))
        with clock.stage("sft"):
            sft_dir = train_sft(sft_cfg)
        plots.add(out / "sft")

        def evaluate(model) -> dict:
            with clock.stage("evaluations"):
                return tool_accuracy(model, tokenizer, data["held_out"], cfg.eval_samples,
                                     cfg.seed)

        sft = evaluate(load_model(sft_dir))
        rl_cfg = grpo_config(
            cfg, out, sft_dir, data["prompts"], loop, max_new_tokens=MAX_NEW_TOKENS, tools=TOOLS,
            max_turns=MAX_TURNS,
            # The demo's own `add`: nothing to contain, and no worker to start per trajectory.
            env_isolation="thread")
        with clock.stage("rl"):
            rl_dir = train_ppo(rl_cfg, reward_fn=tool_reward)
        plots.add(out / "rl")
        rl = evaluate(load_model(rl_dir))
        table = {
            "task": "tool", "algo": "grpo",
            "sft_accuracy": sft["accuracy"], "sft_tool_rate": sft["tool_rate"],
            "rl_accuracy": rl["accuracy"], "rl_tool_rate": rl["tool_rate"],
            "rl_gain_points": 100 * (rl["accuracy"] - sft["accuracy"]),
            **rl_figures(out, clock),
        }
        return written(out, table, plots)


def format_tool_table(table: dict) -> str:
    rows = [
        ("SFT accuracy (held-out, sampled, with the tool)", f"{100 * table['sft_accuracy']:.1f}%"),
        ("SFT trajectories calling the tool", f"{100 * table['sft_tool_rate']:.1f}%"),
        ("GRPO accuracy (held-out, sampled, with the tool)", f"{100 * table['rl_accuracy']:.1f}%"),
        ("GRPO trajectories calling the tool", f"{100 * table['rl_tool_rate']:.1f}%"),
        ("GRPO gain over SFT", f"{table['rl_gain_points']:+.1f} points"),
        *time_rows(table, "GRPO")]
    return aligned(rows)
