"""Generation throughput: our engine vs transformers `generate`, with the decode roofline.

Same random-init model for both (Qwen2.5-0.5B shape by default, `--model qwen3-0.6b` for Qwen3's;
bf16, SDPA), same prompts, greedy decoding of exactly --new-tokens tokens (EOS ignored) at each batch
size. Reports output tokens/s end to end, the speedup, our decode-only tokens/s, and the decode
roofline: (weight bytes + KV bytes read per step) / copy bandwidth measured in this run.

Then the mixed-length case (ours only), the workload vLLM and nano-vllm publish for this model size:
--mixed requests (256) whose prompt and output lengths are drawn uniformly from --mixed-lengths
([100, 1024]) with a fixed seed, temperature 0.6, EOS ignored, all submitted at once to continuous
batching; reported as output tokens/s. `--quick` runs a tiny fp32 model on the CPU to check the
script itself.

    python bench/bench_generate.py                  # GPU: batch 1, 32, 256; 128 prompt + 512 new; mixed
    python bench/bench_generate.py --model qwen3-0.6b --skip-hf
    python bench/bench_generate.py --skip-hf --unfused-decode-gemms   # cuBLAS after each norm, for A/B
    python bench/bench_generate.py --quick          # CPU smoke run
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch
import transformers

from fusedrl.bench import harness
from fusedrl.bench.shapes import QWEN25_05B, QWEN3_06B, TINY
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.scheduler import StepKind
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.runner import kv_bytes_per_block

# --model: (transformers config class, shape, name in the report)
MODELS = {"qwen2.5-0.5b": (transformers.Qwen2Config, QWEN25_05B, "Qwen2.5-0.5B shape (random init)"),
          "qwen3-0.6b": (transformers.Qwen3Config, QWEN3_06B, "Qwen3-0.6B shape (random init)")}


def parse_args(argv=None):
    p = harness.generation_parser(__doc__.splitlines()[0])
    p.add_argument("--skip-hf", action="store_true", help="only our engine")
    p.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b", help="the model shape")
    p.add_argument("--mixed", type=int, help="requests of the mixed-length case (0: skip it)")
    p.add_argument("--mixed-lengths", type=int, nargs=2, metavar=("LOW", "HIGH"),
                   help="prompt and output lengths of the mixed case, uniform in [LOW, HIGH]")
    p.add_argument("--unfused-decode-gemms", action="store_true",
                   help="decode with torch's GEMM after each norm (LLM(fuse_decode_gemms=False)): the "
                        "side-by-side run against kernels/model/norm_linear.py's fused norm + GEMM")
    return harness.generation_args(
        p, "generate", argv=argv,
        quick=dict(batch_sizes=[1, 4], prompt_len=16, new_tokens=32, mixed=8, mixed_lengths=[4, 24]),
        full=dict(batch_sizes=[1, 32, 256], prompt_len=128, new_tokens=512, mixed=256, mixed_lengths=[100, 1024]))


def build_model_dir(args, device, dtype) -> tuple[Path, transformers.PreTrainedModel]:
    config_cls, shape, _ = MODELS[getattr(args, "model", "qwen2.5-0.5b")]
    config = (transformers.Qwen2Config(**TINY) if args.quick else config_cls(**shape))
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    path = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    hf.save_pretrained(path)
    return path, hf


@contextlib.contextmanager
def step_times(llm: LLM):
    """Inside: each engine step's (is_prefill, seconds, rows) appended to the yielded list, timed
    around EngineLoop.step, which returns once the step it reads has its draws on the host (the
    step has finished on the device); its kind and rows are the loop's (`last_kind`,
    `last_drawn`): with decode steps launched ahead (engine_loop.py), those of the step launched
    in the call before. A prompt's chunk counts as a prefill; a speculative verify step, neither."""
    steps = []
    step = llm.step

    def timed():
        t = time.perf_counter()
        out = step()
        seconds = time.perf_counter() - t
        if llm.last_kind in (StepKind.PREFILL, StepKind.CHUNK, StepKind.DECODE):
            steps.append((llm.last_kind is not StepKind.DECODE, seconds, llm.last_drawn))
        return out

    llm.step = timed
    try:
        yield steps
    finally:
        llm.step = step


def time_ours(llm: LLM, prompts, params):
    """(total seconds, decode seconds, decode tokens, outputs), timing each engine step (each ends
    in a sync: step_times)."""
    with step_times(llm) as steps:
        t = time.perf_counter()
        outputs = llm.generate(prompts, params)
        total = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == params.max_new_tokens for o in outputs)
    decode_s, decode_steps, decode_rows = decode_share(steps)
    return total, decode_s, decode_rows, outputs


def decode_share(steps) -> tuple[float, int, int]:
    """Of step_times' steps, the decode steps': (seconds, steps, rows summed over them)."""
    decode = [(dt, b) for is_prefill, dt, b in steps if not is_prefill]
    return sum(dt for dt, _ in decode), len(decode), sum(b for _, b in decode)


def decode_roofline_tok_s(batch: int, mean_context: float, weight_bytes: int, kv_bytes_per_token: int,
                          bandwidth: float) -> float:
    """Decode tokens/s at the memory roofline: a step reads every weight once and the KV of each
    of `batch` sequences' context (`mean_context` tokens), at `bandwidth` bytes/s."""
    return batch * bandwidth / (weight_bytes + batch * mean_context * kv_bytes_per_token)


def time_hf(hf, prompts, new_tokens, device):
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0, use_cache=True)
    with torch.no_grad():
        harness.synchronize(device)
        t = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        harness.synchronize(device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t


def hf_step_seconds(hf, prompts, device, steps: int = 8) -> float:
    """Seconds of one decode step's forward of a transformers model (batch of `prompts`, the KV
    cache of the prompt filled first): the model's own share of generate's time per token."""
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        hf(input_ids=token, past_key_values=cache, use_cache=True)  # the first step: warm-up
        harness.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            hf(input_ids=token, past_key_values=cache, use_cache=True)
        harness.synchronize(device)
    return (time.perf_counter() - start) / steps


def mixed_lengths(args, vocab_size: int):
    """The mixed-length case's requests: (prompts, SamplingParams per request), drawn with seed 0."""
    low, high = args.mixed_lengths
    if not 1 <= low <= high:
        raise SystemExit(f"--mixed-lengths {low} {high}: expected 1 <= LOW <= HIGH")
    g = torch.Generator().manual_seed(0)
    prompt_lens, output_lens = torch.randint(low, high + 1, (2, args.mixed), generator=g).tolist()
    prompts = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in prompt_lens]
    params = [SamplingParams(temperature=0.6, max_new_tokens=n, ignore_eos=True, seed=i)
              for i, n in enumerate(output_lens)]
    return prompts, params


def time_mixed(llm: LLM, args, device) -> dict:
    """Output tokens/s of the mixed-length requests, submitted together (continuous batching), and
    where the call's seconds went: its prefill steps, its decode steps (their count and mean batch)
    and the rest (the engine's host work between steps)."""
    prompts, params = mixed_lengths(args, llm.config.vocab_size)
    harness.synchronize(device)
    with step_times(llm) as steps:
        t = time.perf_counter()
        outputs = llm.generate(prompts, params, decode_text=False)
        seconds = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == sum(p.max_new_tokens for p in params)
    decode_s, decode_steps, decode_rows = decode_share(steps)
    prefill_s = sum(dt for is_prefill, dt, _ in steps if is_prefill)
    return dict(requests=len(prompts), lengths=list(args.mixed_lengths), temperature=0.6,
                prompt_tokens=sum(map(len, prompts)), output_tokens=tokens, seconds=seconds,
                output_tok_s=tokens / seconds, preemptions=llm.scheduler.num_preemptions,
                prefill_s=prefill_s, prefill_steps=len(steps) - decode_steps, decode_s=decode_s,
                decode_steps=decode_steps, mean_decode_batch=decode_rows / max(decode_steps, 1),
                between_steps_s=seconds - prefill_s - decode_s)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    path, hf = build_model_dir(args, device, dtype)
    hf.config._attn_implementation = "sdpa"
    max_batch = max(args.batch_sizes + [args.mixed])
    kv_memory = 0.5 if device.type == "cuda" else 256 << 20
    llm = LLM(path, dtype=dtype, device=str(device), kv_cache_memory=kv_memory, max_num_seqs=max_batch,
              fuse_decode_gemms=not args.unfused_decode_gemms)
    config = llm.config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())  # tied: once
    kv_bytes_per_token = kv_bytes_per_block(config, dtype, 1)
    bandwidth = harness.copy_bandwidth_gbps(device, 1 << 30 if device.type == "cuda" else 64 << 20) * 1e9
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    # Warm-up: Triton compilation and allocator growth stay out of the timings.
    llm.generate(torch.randint(0, config.vocab_size, (4, args.prompt_len), generator=g).tolist(),
                 SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))

    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        total, decode_s, decode_tokens, _ = time_ours(llm, prompts, params)
        ours = batch * args.new_tokens / total
        roofline = decode_roofline_tok_s(batch, args.prompt_len + args.new_tokens / 2, weight_bytes,
                                         kv_bytes_per_token, bandwidth)
        decode = decode_tokens / decode_s
        row = dict(batch=batch, ours_tok_s=ours, decode_tok_s=decode, roofline_tok_s=roofline,
                   decode_vs_roofline=decode / roofline)
        if not args.skip_hf:
            hf_s = time_hf(hf, prompts, args.new_tokens, device)
            row.update(hf_tok_s=batch * args.new_tokens / hf_s, speedup=ours * hf_s / (batch * args.new_tokens))
        rows.append(row)

    print(harness.format_table(rows, COLUMNS))
    mixed = time_mixed(llm, args, device) if args.mixed else None
    if mixed:
        print(f"mixed lengths: {mixed['requests']} requests, prompt and output lengths uniform in "
              f"{mixed['lengths']}, T=0.6: {mixed['output_tokens']} output tokens in {mixed['seconds']:.2f} s = "
              f"{mixed['output_tok_s']:.0f} tok/s ({mixed['preemptions']} preemptions)")
    result = dict(meta=harness.run_metadata(device), dtype=str(dtype),
                  model="tiny" if args.quick else MODELS[args.model][2],
                  fuse_decode_gemms=not args.unfused_decode_gemms,
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, weight_bytes=weight_bytes,
                  kv_bytes_per_token=kv_bytes_per_token, copy_bandwidth_GBps=bandwidth / 1e9,
                  transformers=transformers.__version__, rows=rows, mixed=mixed)
    harness.write_json(args.out, result)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, weights {weight_bytes / 1e6:.1f} MB; wrote {args.out}")


COLUMNS = [("batch", "batch"), ("ours_tok_s", "ours tok/s"), ("hf_tok_s", "hf tok/s"), ("speedup", "speedup"),
           ("decode_tok_s", "decode tok/s"), ("roofline_tok_s", "roofline tok/s"),
           ("decode_vs_roofline", "of roofline")]


if __name__ == "__main__":
    main()
