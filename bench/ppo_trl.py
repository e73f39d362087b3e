"""The TRL sides of bench_ppo.py: trl 0.29's PPOTrainer (`trl.experimental.ppo`) and TRL's
GRPOTrainer on the same checkpoints and prompts as ours, each timed over its second iteration
(bench_ppo.py's docstring says how each is set up and measured)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import transformers

from fusedrl.bench import timing
from fusedrl.bench.ppo_common import (
    GRPO_KL_COEF,
    IterationClock,
    Shape,
    build_tokenizer,
    even_token_share,
    lora_targets,
    make_prompts,
)


# trl 0.29's local_rollout_forward_batch_size: the rows its rollout generates and forwards at once.
ROLLOUT_ROWS = 64


def peft_config(lora: int):
    """TRL's side of --lora: PEFT adapters of the same rank, alpha and targets as ours (None:
    full fine-tuning)."""
    if not lora:
        return None
    import peft

    return peft.LoraConfig(
        r=lora, lora_alpha=2 * lora, target_modules=lora_targets(), task_type="CAUSAL_LM"
    )


def run_trl_grpo(shape: Shape, policy_dir: Path, device: torch.device, lora: int) -> dict:
    """TRL's GRPOTrainer on the same policy and prompts: one generation of all rows per iteration,
    `minibatches` optimizer steps of `micro`-row micro-batches over it."""
    import datasets
    import trl
    from trl import GRPOConfig, GRPOTrainer

    clock, generate_s, generated = IterationClock(device), [], []
    steps = {"done": 0}

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps["done"] += 1
            if (
                steps["done"] % shape.minibatches == 0
            ):  # an iteration: one generation's optimizer steps
                clock.mark()

    cuda = device.type == "cuda"
    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    tokenizer = build_tokenizer(policy.config.eos_token_id, policy.config.vocab_size)
    generate = policy.generate

    def timed_generate(*args, **kwargs):  # once per generation (the whole batch)
        timing.synchronize(device)
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        timing.synchronize(device)
        generate_s.append(time.perf_counter() - start)
        prompt_width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        generated.append(out.shape[0] * (out.shape[1] - prompt_width))  # [rows, prompt + generated]
        return out

    policy.generate = timed_generate
    prompts = [" ".join(f"t{i}" for i in p) for p in make_prompts(shape, policy.config.vocab_size)]
    rows = datasets.Dataset.from_list([{"prompt": p} for p in prompts])  # TRL 1.x takes a Dataset
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"),
        per_device_train_batch_size=shape.micro,
        gradient_accumulation_steps=shape.rows // shape.minibatches // shape.micro,
        steps_per_generation=shape.rows // shape.micro,
        num_generations=shape.samples,
        max_completion_length=shape.new_tokens,
        generation_kwargs={"min_new_tokens": shape.new_tokens},
        temperature=1.0,
        beta=GRPO_KL_COEF,
        num_iterations=1,
        max_steps=2 * shape.minibatches,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10**6,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=even_token_share,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        callbacks=[Clock()],
        peft_config=peft_config(lora),
    )
    clock.mark()
    trainer.train()
    return {
        **clock.result(),
        "response_tokens": generated[-1],
        "time_generate": generate_s[-1],
        "generations": len(generate_s),
        "trl": trl.__version__,
    }


def trl_ppo_models(policy_dir: Path, rm_dir: Path, lora: int) -> tuple:
    """TRL PPO's four models in fp32: policy, reference (None with LoRA: TRL's reference is then the
    policy with its adapters disabled), reward and value (both from the reward model)."""
    load = dict(dtype=torch.float32)
    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, **load)
    reference = (
        None if lora else transformers.AutoModelForCausalLM.from_pretrained(policy_dir, **load)
    )
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, **load)
    value = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, **load)
    return policy, reference, reward, value


def run_trl(shape: Shape, policy_dir: Path, rm_dir: Path, device: torch.device, lora: int,
            rollout_rows: int = 0) -> dict:
    """One TRL PPO iteration; rollout_rows: its local_rollout_forward_batch_size (0: TRL's
    default, ROLLOUT_ROWS)."""
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    clock, generate_s, generated = IterationClock(device), [], []
    batch_generation = trl_ppo.batch_generation

    def timed_generation(*args, **kwargs):  # TRL calls it once per iteration
        timing.synchronize(device)
        start = time.perf_counter()
        out = batch_generation(*args, **kwargs)
        timing.synchronize(device)
        generate_s.append(time.perf_counter() - start)
        rows, width = out[0].shape  # [rows, prompt + generated]; no stop token
        generated.append(rows * (width - shape.prompt_len))
        return out

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    cuda = device.type == "cuda"
    policy, reference, reward, value = trl_ppo_models(policy_dir, rm_dir, lora)
    tokenizer = build_tokenizer(policy.config.eos_token_id)
    rows = [
        {"input_ids": p}
        for p in make_prompts(shape, policy.config.vocab_size)
        for _ in range(shape.samples)
    ]
    output_dir = tempfile.mkdtemp(prefix="bench_ppo_trl_")  # save_strategy="no": stays empty
    args = PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=shape.micro,
        gradient_accumulation_steps=shape.rows // shape.micro,
        num_mini_batches=shape.minibatches,
        **({"local_rollout_forward_batch_size": rollout_rows} if rollout_rows else {}),
        num_ppo_epochs=1,
        response_length=shape.new_tokens,
        total_episodes=2 * shape.rows,
        temperature=1.0,
        kl_coef=0.05,
        vf_coef=0.1,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        num_sample_generations=0,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        value_model=value,
        train_dataset=rows,
        eval_dataset=rows[:1],
        callbacks=[Clock()],
        peft_config=peft_config(lora),
    )
    clock.mark()
    trl_ppo.batch_generation = timed_generation
    try:
        trainer.train()
    finally:  # --quick runs the next side in this process
        trl_ppo.batch_generation = batch_generation
    return {
        **clock.result(),
        "response_tokens": generated[-1],
        "time_generate": generate_s[-1],
        "trl": trl.__version__,
        "local_rollout_forward_batch_size": args.local_rollout_forward_batch_size,
    }
