"""The generate suite, with bench_generate.py's measuring code: greedy decode at batch 1 (ours and
transformers' `generate` on the same checkpoint) and at batch 256 (ours), then the mixed workload
(ours: requests whose prompt and output lengths are uniform in [100, 1024], all submitted at once,
temperature 0.6), every output exactly its length (end-of-sequence ignored), then decode at batch 1
again with each RMSNorm and the projection after it unfused (cuBLAS's GEMMs): the A/B of the fused
norm + GEMM kernel. On a GPU each decode row of ours has beside it the same engine with its steps
not overlapped (each read before the next is launched): the A/B of engine_loop.py's steps launched
ahead, which the CPU does not launch ahead (no A/B row there).

fraction_of_limit is the decode tokens/s over the decode roofline: a step reads every weight once
and each sequence's KV at the device's bandwidth. For the mixed workload the roofline is taken at
the batch the engine holds (every request, up to max_num_seqs) and the mean context (mean prompt +
half the mean output), and the output tokens/s include the prefills: a bound, not a target.

The vision-language rollout (bench_vlm_rollout.py): P prompts of one image each, n samples per
prompt at temperature 1, ours and transformers' `generate` on the same random-init Qwen2.5-VL;
tokens/s include the vision tower, whose seconds and share of the rollout each row gives.
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
import time

import torch

from .. import bench_generate, bench_vlm_rollout, results, shapes, timing
from ..cases import Case
from ..context import Context, free_device, peer_version

SUITE = "generate"
ENGINE = "generate engine"  # the Context.shared key of the decode and mixed cases' engine
UNFUSED = "fusedrl, norm + cuBLAS GEMMs"  # the decode A/B's row (unfused_decode_case)
NOT_OVERLAPPED = "fusedrl, steps not overlapped"  # beside each decode row (not_overlapped_row)
# What a decode row's fraction divides: ours times its decode steps apart from the prefill;
# transformers' generate gives only the whole call (prefill included: a lower fraction).
DECODE_STEPS_LIMIT = "decode roofline (the decode steps' tokens/s)"
WHOLE_CALL_LIMIT = "decode roofline (the whole call's tokens/s, prefill included)"
NO_FUSED_DECODE = ("not run: the fused decode kernels do not run here (the PyTorch backend), so "
                   "both sides of the A/B would be the same path")


@dataclasses.dataclass(frozen=True)
class Shape:
    """prompt and new tokens of the fixed-length decode, its batches, and the mixed workload's
    requests and length range."""
    prompt_len: int
    new_tokens: int
    batches: tuple[int, ...]
    mixed: int
    mixed_lengths: tuple[int, int]


FULL = Shape(128, 512, (1, 256), 256, (100, 1024))
# transformers' decode at batch 1 runs this many new tokens at most (its row says so).
HF_NEW_TOKENS = 64
QUICK = Shape(16, 32, (1, 16), 16, (8, 64))


@dataclasses.dataclass(frozen=True)
class Engine:
    """What the suite's cases share: the checkpoint, our LLM on it, its sizes."""
    model: shapes.ModelDir
    llm: object
    weight_bytes: int
    kv_per_token: int


def engine(ctx: Context, shape: Shape) -> Engine:
    """The suite's checkpoint and LLM, made once (warmed up: compiles stay out of the timings)."""
    def make():
        from fusedrl.engine.inference.llm import LLM
        from fusedrl.engine.inference.runner import kv_bytes_per_block
        from fusedrl.engine.inference.sampling_params import SamplingParams
        device, dtype = ctx.device, ctx.dtype
        model = shapes.model_dir(ctx.options.model, ctx.quick, ctx.options.seed, dtype, device)
        llm = LLM(model.path, dtype=dtype, device=str(device),
                  max_num_seqs=max(shape.mixed, *shape.batches),
                  kv_cache_memory=0.5 if device.type == "cuda" else 256 << 20)
        g = torch.Generator().manual_seed(ctx.options.seed)
        with timing.warm_up():
            llm.generate(torch.randint(0, llm.config.vocab_size, (2, shape.prompt_len),
                                       generator=g).tolist(),
                         SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        return Engine(model, llm, weight_bytes, kv_bytes_per_block(llm.config, dtype, 1))
    return ctx.shared(ENGINE, make, lambda e: e.model.remove())


def decode_name(ctx: Context, shape: Shape, batch: int) -> str:
    return (f"decode batch {batch} (prompt {shape.prompt_len}, {shape.new_tokens} new; "
            f"{shapes.model_label(ctx.options.model, ctx.quick, ctx.options.seed)})")


def mixed_name(ctx: Context, shape: Shape) -> str:
    low, high = shape.mixed_lengths
    return (f"mixed: {shape.mixed} requests, lengths uniform in [{low}, {high}] "
            f"({shapes.model_label(ctx.options.model, ctx.quick, ctx.options.seed)})")


def decode_rows(ctx: Context, shape: Shape, batch: int):
    """Ours at `batch` (and transformers' at batch 1), against the same roofline."""
    e = engine(ctx, shape)
    inputs = decode_inputs(ctx, shape, batch, e)
    yield ours_row(ctx, shape, batch, e, e.llm, "fusedrl", inputs)
    if batch == 1:
        new = min(shape.new_tokens, HF_NEW_TOKENS)
        hf_roofline = bench_generate.decode_roofline_tok_s(
            1, shape.prompt_len + new / 2, e.weight_bytes, e.kv_per_token, ctx.limits.bytes_per_s)
        yield hf_row(ctx, e.model, inputs[0], new, decode_name(ctx, shape, batch), hf_roofline)
    if e.llm.overlap:
        yield not_overlapped_row(ctx, shape, batch, e, inputs)


def decode_inputs(ctx: Context, shape: Shape, batch: int, e: Engine):
    """The case's prompts [batch, prompt_len], its greedy fixed-length params and its roofline."""
    from fusedrl.engine.inference.sampling_params import SamplingParams
    g = torch.Generator().manual_seed(ctx.options.seed + batch)
    prompts = torch.randint(0, e.llm.config.vocab_size, (batch, shape.prompt_len),
                            generator=g).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=shape.new_tokens, ignore_eos=True)
    roofline = bench_generate.decode_roofline_tok_s(
        batch, shape.prompt_len + shape.new_tokens / 2, e.weight_bytes, e.kv_per_token,
        ctx.limits.bytes_per_s)
    return prompts, params, roofline


def ours_row(ctx: Context, shape: Shape, batch: int, e: Engine, llm, impl: str,
             inputs: tuple) -> dict:
    """`llm`'s decode of the case's `inputs` (decode_inputs'): its row as `impl`."""
    prompts, params, roofline = inputs
    total, decode_s, decode_tokens, _ = bench_generate.time_ours(llm, prompts, params)
    return results.make_row(
        SUITE, decode_name(ctx, shape, batch), impl,
        fraction_of_limit=decode_tokens / decode_s / roofline, limit=DECODE_STEPS_LIMIT,
        seconds=total, tok_s=batch * shape.new_tokens / total,
        decode_tok_s=decode_tokens / decode_s, roofline_tok_s=roofline,
        weight_bytes=e.weight_bytes)


def not_overlapped_row(ctx: Context, shape: Shape, batch: int, e: Engine, inputs: tuple) -> dict:
    """The suite's engine with each decode step read before the next is launched (its overlap off
    for this row alone): the A/B of decode steps launched ahead, on the same graphs and weights."""
    e.llm.overlap = False
    try:
        return ours_row(ctx, shape, batch, e, e.llm, NOT_OVERLAPPED, inputs)
    finally:
        e.llm.overlap = True


def unfused_decode_case(ctx: Context, batch: int) -> Case:
    """Ours at `batch` with each decode RMSNorm and the projection after it unfused (the norm
    kernel, then cuBLAS; SiLU * up a kernel of its own): beside the decode row, the A/B that keeps
    or drops kernels/model/norm_linear.py's fusion for decode steps (45% of a batch-1 step's device
    time on an H100 in bench/results/2026-11-27-h100-2)."""
    shape = QUICK if ctx.quick else FULL
    return Case(SUITE, decode_name(ctx, shape, batch), (UNFUSED,),
                functools.partial(unfused_rows, ctx, shape, batch), shares=(ENGINE,),
                model_paths=True)


def unfused_rows(ctx: Context, shape: Shape, batch: int):
    """A second engine on the suite's checkpoint, fuse_decode_gemms=False, its KV pool sized for
    the case's sequences alone (and its graphs for `batch` rows at most), warmed up, then timed
    as the fused one is."""
    from fusedrl.engine.inference.llm import LLM
    from fusedrl.engine.inference.sampling_params import SamplingParams
    from fusedrl.kernels import fused_for_model
    if not fused_for_model(torch.empty(0, device=ctx.device)):  # both sides the same path
        yield results.missing_row(SUITE, decode_name(ctx, shape, batch), UNFUSED, NO_FUSED_DECODE,
                                  DECODE_STEPS_LIMIT)
        return
    e = engine(ctx, shape)
    kv_bytes = 2 * batch * (shape.prompt_len + shape.new_tokens) * e.kv_per_token + (16 << 20)
    llm = LLM(e.model.path, dtype=ctx.dtype, device=str(ctx.device), max_num_seqs=batch,
              kv_cache_memory=kv_bytes, fuse_decode_gemms=False)
    try:
        inputs = decode_inputs(ctx, shape, batch, e)
        warm_up = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
        with timing.warm_up():
            llm.generate(inputs[0], warm_up)
        yield ours_row(ctx, shape, batch, e, llm, UNFUSED, inputs)
    finally:
        del llm
        free_device(ctx.device)


def hf_row(ctx: Context, model, prompts, new_tokens: int, name: str, roofline: float) -> dict:
    """transformers' `generate` on the same checkpoint and prompt, its fair settings named in the
    row (the suite's dtype, SDPA, the KV cache on; greedy, no stop), new_tokens of them (its
    tokens/s is flat over the length: a few seconds say it); the model loaded onto the device
    directly. forward_ms: one decode step's forward alone (the model's share of a token's time,
    the rest being generate's own)."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model.path, dtype=ctx.dtype, attn_implementation="sdpa",
        device_map=str(ctx.device)).eval()
    settings = (f"{hf.config._attn_implementation}, {str(ctx.dtype).replace('torch.', '')}, KV "
                f"cache {'on' if hf.generation_config.use_cache else 'off'}; {new_tokens} new")
    with timing.warm_up():
        bench_generate.time_hf(hf, prompts, 4, ctx.device)
    seconds = bench_generate.time_hf(hf, prompts, new_tokens, ctx.device)
    forward_s = bench_generate.hf_step_seconds(hf, prompts, ctx.device)
    return results.make_row(
        SUITE, name, f"transformers {peer_version('transformers')} ({settings})",
        fraction_of_limit=new_tokens / seconds / roofline, limit=WHOLE_CALL_LIMIT,
        seconds=seconds, tok_s=new_tokens / seconds, new_tokens=new_tokens,
        forward_ms=forward_s * 1e3, roofline_tok_s=roofline)


def mixed_rows(ctx: Context, shape: Shape):
    e = engine(ctx, shape)
    mixed = bench_generate.time_mixed(e.llm, shape, ctx.device)
    batch = min(shape.mixed, e.llm.scheduler.max_num_seqs)
    mean_context = (mixed["prompt_tokens"] + mixed["output_tokens"] / 2) / mixed["requests"]
    roofline = bench_generate.decode_roofline_tok_s(batch, mean_context, e.weight_bytes,
                                                    e.kv_per_token, ctx.limits.bytes_per_s)
    yield results.make_row(
        SUITE, mixed_name(ctx, shape), "fusedrl",
        fraction_of_limit=mixed["output_tok_s"] / roofline,
        limit=f"decode roofline at batch {batch}", seconds=mixed["seconds"],
        tok_s=mixed["output_tok_s"], output_tokens=mixed["output_tokens"],
        prompt_tokens=mixed["prompt_tokens"], preemptions=mixed["preemptions"],
        roofline_tok_s=roofline, prefill_s=mixed["prefill_s"], prefill_steps=mixed["prefill_steps"],
        decode_s=mixed["decode_s"], decode_steps=mixed["decode_steps"],
        mean_decode_batch=mixed["mean_decode_batch"], between_steps_s=mixed["between_steps_s"])


def vlm_name(ctx: Context) -> str:
    r = bench_vlm_rollout.QUICK if ctx.quick else bench_vlm_rollout.FULL
    model = "tiny Qwen2.5-VL" if ctx.quick else "Qwen2.5-VL-3B text shape, 8-block tower"
    return (f"vlm rollout: {r.prompts} prompts x 1 image ({r.grid[1]}x{r.grid[2]} patches) x "
            f"{r.samples} samples, {r.new_tokens} new ({model}, random init)")


def vlm_rows(ctx: Context):
    """A GRPO-style rollout with images, ours then transformers': sampled tokens/s (the vision
    tower included), the tower's seconds and share, against the decode roofline at batch P x n."""
    from fusedrl.engine.inference.llm import LLM
    from fusedrl.engine.inference.runner import kv_bytes_per_block
    r = bench_vlm_rollout.QUICK if ctx.quick else bench_vlm_rollout.FULL
    path, hf = bench_vlm_rollout.build(ctx.quick, ctx.options.seed, ctx.dtype, ctx.device)
    try:
        llm = LLM(path, dtype=ctx.dtype, device=str(ctx.device),
                  max_num_seqs=r.prompts * r.samples,
                  kv_cache_memory=0.5 if ctx.device.type == "cuda" else 256 << 20)
        ids, images = bench_vlm_rollout.prompts(hf.config, r, ctx.options.seed)
        decoder_bytes = sum(p.numel() * p.element_size()
                            for name, p in llm.model.named_parameters()
                            if not name.startswith("visual."))
        roofline = bench_generate.decode_roofline_tok_s(
            r.prompts * r.samples, len(ids[0]) + r.new_tokens / 2, decoder_bytes,
            kv_bytes_per_block(llm.config, ctx.dtype, 1), ctx.limits.bytes_per_s)
        runs = {"fusedrl": lambda: bench_vlm_rollout.time_ours(llm, ids, images, r,
                                                               ctx.options.seed, ctx.device),
                f"transformers {peer_version('transformers')}":
                    lambda: bench_vlm_rollout.time_hf(hf, ids, images, r, ctx.device)}
        for impl, run in runs.items():
            yield vlm_row(ctx, impl, run, roofline)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def vlm_row(ctx: Context, impl: str, run, roofline: float) -> dict:
    """One implementation's row: a warm-up rollout, then 3 timed; the median one's figures."""
    start = time.perf_counter()
    run()  # the warm-up: the row's compile_s
    warmup_s = time.perf_counter() - start
    rollouts = [run() for _ in range(3)]
    seconds = [x["seconds"] for x in rollouts]
    timing.note(timing.Timing.of(seconds, warmup_s, sum(seconds)))
    median = sorted(rollouts, key=lambda x: x["seconds"])[1]
    tok_s = median["tokens"] / median["seconds"]
    return results.make_row(
        SUITE, vlm_name(ctx), impl, fraction_of_limit=tok_s / roofline,
        limit="decode roofline at batch prompts x samples", seconds=median["seconds"],
        tok_s=tok_s, tower_s=median["tower_s"], tower_share=median["tower_s"] / median["seconds"],
        tower_runs=median["tower_runs"], output_tokens=median["tokens"], roofline_tok_s=roofline)


def vlm_case(ctx: Context) -> Case:
    return Case(SUITE, vlm_name(ctx), ("fusedrl", "transformers"),
                functools.partial(vlm_rows, ctx), model_paths=True)


def decode_case(ctx: Context, batch: int) -> Case:
    shape = QUICK if ctx.quick else FULL
    # LLM's overlap_decode default: steps launched ahead on a GPU, the A/B's other side
    impls = (("fusedrl",) + (("transformers",) if batch == 1 else ())
             + ((NOT_OVERLAPPED,) if ctx.device.type == "cuda" else ()))
    return Case(SUITE, decode_name(ctx, shape, batch), impls,
                functools.partial(decode_rows, ctx, shape, batch), shares=(ENGINE,),
                model_paths=True)


def mixed_case(ctx: Context) -> Case:
    shape = QUICK if ctx.quick else FULL
    return Case(SUITE, mixed_name(ctx, shape), ("fusedrl",),
                functools.partial(mixed_rows, ctx, shape), shares=(ENGINE,), model_paths=True)


def cases(ctx: Context) -> list[Case]:
    """Decode at each batch, the mixed workload, decode at batch 1 unfused (the A/B of the fused
    norm + GEMM), then the vision-language rollout."""
    shape = QUICK if ctx.quick else FULL
    return [*(decode_case(ctx, batch) for batch in shape.batches), mixed_case(ctx),
            unfused_decode_case(ctx, 1), vlm_case(ctx)]
