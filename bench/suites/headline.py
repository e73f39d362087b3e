"""The headline set: one case per claim of the GPU bars, ordered by what matters, each beside its
peer where installed, taken from the other suites (their measuring code, their rows, named suite
"headline"): decode at batch 1 and 256 at the model's shape, the mixed workload, a
1k-token training micro-batch, one GRPO and one PPO iteration (the latter's peak beside
`fusedrl plan`'s), the sampler at batch 1, the small RL ops at 256 x 2048 fp32, the log-prob +
entropy at TRL's shape (8,192 tokens, V 151,936, bf16) from logits (forward, beside TRL's two
passes; TRL publishes 0.89 ms for its fused kernel) and from hidden states (H 4,096, forward +
backward), the fused head's memory and time at Liger's (the GRPO loss from hidden states,
V 128,256, H 4,096, 4,096 tokens), the distillation divergence, and an MoE decode step at
Qwen3-30B-A3B's layer shape; then the training micro-batch replayed from a CUDA graph (after every
claim of ours: a capture that fails, or leaves the device in error, costs no other row of ours);
then the slow peers, TRL's GRPO and PPO trainers (a process each, a minute or more), so that every
claim has its row first; last, decode at batch 1 with the norms and GEMMs unfused (the A/B of the
fused kernel, which tune_decode.md now times kernel by kernel: the H200 visit's 21 s went to it
before the rows of four claims were reached; a second engine, built again here). --quick: the
same claims at shapes a CPU runs in seconds whose [N, V] logits (32-64 MiB) still set the fused
paths' memory apart.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .. import bench_kernels, bench_sampler, results, shapes, timing
from ..cases import Case
from ..context import Context
from . import generate, kernels, rl, train

SUITE = "headline"
ALGOS = ("grpo", "ppo")


def headline(case: Case) -> Case:
    """`case` of another suite, its rows in this one."""
    def measure():
        for row in case.measure():
            yield {**row, "suite": SUITE}
    return dataclasses.replace(case, suite=SUITE, measure=measure)


def moe_rows(ctx: Context):
    """Greedy decode at batch 1 through the engine on a 2-layer Qwen3-30B-A3B model (quick: its
    tiny shape): decode tokens/s and ms per step (both layers, the LM head and the sampler)."""
    from fusedrl.bench import bench_moe_decode
    from fusedrl.engine.inference.llm import LLM
    from fusedrl.engine.inference.sampling_params import SamplingParams
    shape = shapes.moe_decode_shape(ctx.quick)
    model = bench_moe_decode.moe_model(shape, 2, ctx.dtype, ctx.device)
    llm = LLM(model, kv_cache_memory=(1 << 24) if ctx.device.type == "cpu" else (8 << 30))
    prompt_len, new_tokens = (16, 16) if ctx.quick else (128, 128)
    prompts = torch.randint(0, model.config.vocab_size, (1, prompt_len),
                            generator=torch.Generator().manual_seed(ctx.options.seed)).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    with timing.warm_up():
        bench_moe_decode.time_ours(llm, prompts, params)
    _, decode_s, decode_tokens, _ = bench_moe_decode.time_ours(llm, prompts, params)
    seconds = decode_s / decode_tokens  # one step at batch 1
    roofline = ctx.limits.bytes_per_s / active_weight_bytes(model, shape)
    yield results.make_row(
        SUITE, moe_name(ctx), "fusedrl", fraction_of_limit=(1 / seconds) / roofline,
        limit="decode roofline (active weights)", seconds=seconds,
        decode_tok_s=decode_tokens / decode_s, roofline_tok_s=roofline)


def active_weight_bytes(model, shape: dict) -> int:
    """The bytes a decode step at batch 1 must read: every weight but the experts, and of each
    layer's experts the top-k the token is routed to (the embedding row left out)."""
    share = shape["num_experts_per_tok"] / shape["num_experts"]
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size() * (share if ".experts." in name else 1)
    return int(total)


def moe_name(ctx: Context) -> str:
    return (f"moe decode step batch 1, Qwen3-30B-A3B layer shape x2"
            f"{' (tiny)' if ctx.quick else ''}")


def kernel_case(ctx: Context, case) -> Case:
    budget, reps, host_calls = (0.05, 2, 2) if ctx.quick else (1.0, 3, None)
    return headline(kernels.kernel_case(ctx, case, budget, reps, host_calls))


def cases(ctx: Context) -> list[Case]:
    """The claims, in order (see the module's docstring)."""
    shape = generate.QUICK if ctx.quick else generate.FULL
    dtype = ctx.dtype
    n, h, v = shapes.TRL_LOGPROBS_QUICK if ctx.quick else shapes.TRL_LOGPROBS
    logprobs = [c for c in bench_kernels.linear_token_logprobs_cases(n, h, v, dtype)
                if c.mode == "fwd+bwd"]
    head = shapes.LIGER_HEAD_QUICK if ctx.quick else shapes.LIGER_HEAD
    distill = kernels.distill_shape(ctx.quick)
    budget = 0.05 if ctx.quick else 1.0
    vocab = bench_sampler.VOCAB
    train_tokens = 128 if ctx.quick else 1024
    return [
        *(headline(generate.decode_case(ctx, batch)) for batch in shape.batches),
        headline(generate.mixed_case(ctx)),
        headline(train.cases_at(ctx, train_tokens)),
        *(headline(rl.ours_case(ctx, algo)) for algo in ALGOS),
        headline(Case(kernels.SUITE, kernels.sampler_name(1, vocab), kernels.SAMPLER_IMPLS,
                      functools.partial(kernels.sampler_rows, ctx, 1, vocab, budget),
                      model_paths=True)),
        *(kernel_case(ctx, case) for case in bench_kernels.rl_cases(*shapes.RL_OPS)),
        *(kernel_case(ctx, case) for case in bench_kernels.logprobs_entropy_cases(n, v, dtype)),
        *(kernel_case(ctx, case) for case in logprobs),
        headline(Case(kernels.SUITE, kernels.grpo_loss_name(*head),
                      ("eager", "fusedrl", "fusedrl recompute", "liger", "trl"),
                      functools.partial(kernels.grpo_loss_rows, ctx, head))),
        headline(Case(kernels.SUITE, kernels.distill_name(*distill, ctx.device),
                      ("eager", "fusedrl", "trl", "liger"),
                      functools.partial(kernels.distill_rows, ctx))),
        Case(SUITE, moe_name(ctx), ("fusedrl",), functools.partial(moe_rows, ctx),
             model_paths=True),
        headline(train.cases_at(ctx, train_tokens, captured=True)),
        *(headline(rl.peer_case(ctx, algo)) for algo in ALGOS),
        headline(generate.unfused_decode_case(ctx, 1)),
    ]
