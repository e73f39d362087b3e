"""The train suite, with bench_train_step.py's measuring code: one micro-batch's forward, fused LM
head log-probs and backward, then the optimizer step (FusedAdamW, clipped), on the engine's model of
the named shape (random weights; a local directory's config.json gives the shape, its weights are
not read: the cost does not depend on them).

MFU (the fraction_of_limit): model FLOPs per second over the device's FLOP/s, the model FLOPs being
6 per matmul weight per token (forward 2, backward 4; the LM head included, the embedding lookup
not) plus causal attention's 6 x 2 x layers x (sequence / 2) x query width per token.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import bench_train_step, results, shapes
from ..cases import Case
from ..context import Context

SUITE = "train"
GRAPH_IMPL = "fusedrl CUDA graph"  # the micro-batch replayed (engine/train/captured_micro_batch.py)
LIMIT = "MFU (FLOP/s)"
MODEL = "train model"  # the Context.shared key of the model and optimizer its cases share


def engine_model(ctx: Context):
    """The engine's CausalLM of ctx's model (a named shape or a local directory's config.json),
    normal(0, 0.02) weights."""
    from fusedrl.engine.model.config import ModelConfig
    from fusedrl.engine.model.hf_io import load_config
    model = ctx.options.model
    config = (load_config(Path(model)) if Path(model).is_dir()
              else ModelConfig.from_hf(shapes.hf_config(model, ctx.quick)))
    torch.manual_seed(ctx.options.seed)
    return shapes.random_causal_lm(config, ctx.dtype, ctx.device)


def flops_per_token(lm, seq_len: int) -> float:
    """Forward + backward FLOPs of one token: 6 per matmul weight, plus causal attention's."""
    c = lm.config
    matmul = sum(p.numel() for name, p in lm.named_parameters()
                 if p.dim() == 2 and "embed" not in name)
    if c.tie_word_embeddings:  # the head's GEMM reads the embedding
        matmul += c.vocab_size * c.hidden_size
    attention = 2 * 2 * c.num_layers * (seq_len / 2) * c.num_heads * c.head_dim
    return 6 * matmul + 3 * attention


def train_name(ctx: Context, tokens: int, seq_len: int) -> str:
    label = f"{ctx.options.model}{' tiny' if ctx.quick else ''}"
    return f"{tokens} tokens, sequences of {min(seq_len, tokens)} ({label})"


def step_rows(ctx: Context, tokens: int, seq_len: int, suite: str = SUITE, captured: bool = False):
    """One micro-batch of `tokens` through forward + backward (captured: replayed from a CUDA
    graph, a GPU only), then the optimizer step."""
    from fusedrl.engine.train.fused_adamw import FusedAdamW
    name, impl = train_name(ctx, tokens, seq_len), GRAPH_IMPL if captured else "fusedrl"
    if captured and ctx.device.type != "cuda":
        yield results.missing_row(suite, name, impl, results.NO_CUDA_GRAPHS, LIMIT)
        return

    def make():
        lm = engine_model(ctx)
        return lm, FusedAdamW(list(lm.parameters()), lr=1e-5)
    lm, optimizer = ctx.shared(MODEL, make)
    # 2 s of calls: the H200 visit's 5 s gave 56 calls of ~100 ms within 7% of their median (p20,
    # p80), and the headline set's minutes are short
    step = bench_train_step.measure_step(lm, optimizer, tokens, seq_len, ctx.device,
                                         budget_s=0.5 if ctx.quick else 2.0, captured=captured)
    loop, update = step["timings"]
    seconds = loop.median_s + update.median_s
    flops = flops_per_token(lm, min(seq_len, tokens)) * tokens
    yield results.make_row(
        suite, name, impl, fraction_of_limit=ctx.flops_fraction(flops / seconds), limit=LIMIT,
        seconds=seconds, seconds_p20=loop.p20_s + update.p20_s,
        seconds_p80=loop.p80_s + update.p80_s, n=min(loop.n, update.n),
        tokens_per_s=tokens / seconds, fwd_bwd_ms=step["fwd_bwd_ms"],
        optimizer_step_ms=step["optimizer_step_ms"], model_flops=flops)


def cases_at(ctx: Context, tokens: int, captured: bool = False) -> Case:
    """The micro-batch of `tokens` tokens (sequences of 256; quick: 64), called or (captured)
    replayed from a CUDA graph: a case of its own, so that a capture that fails, or leaves the
    device in error, costs no other row when it runs last."""
    seq_len = 64 if ctx.quick else 256
    return Case(SUITE, train_name(ctx, tokens, seq_len), (GRAPH_IMPL if captured else "fusedrl",),
                functools.partial(step_rows, ctx, tokens, seq_len, captured=captured),
                shares=(MODEL,), model_paths=True)


def cases(ctx: Context) -> list[Case]:
    """One case per micro-batch size (quick: 128 tokens), called; then each replayed from a CUDA
    graph."""
    sizes = [128] if ctx.quick else [1024, 4096, 16384]
    return [cases_at(ctx, tokens, captured) for captured in (False, True) for tokens in sizes]
