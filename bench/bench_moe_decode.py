"""MoE decode at Qwen3-30B-A3B's layer shape: a 2-layer random bf16 model (hidden 2048, 32/4 heads
of 128, 128 experts, top-8, expert width 768, vocabulary 151936) generating greedily through the
engine, its decode steps CUDA graphs. Reports per batch size the decode tokens/s and ms per step
(each step both layers plus the LM head and the sampler), and the grouped GEMM path the dispatcher
picked.

    python bench/bench_moe_decode.py [--out FILE.json]     # GPU (gpu.sh stage moe_decode)
    python bench/bench_moe_decode.py --quick               # a tiny fp32 model on the CPU
"""
from __future__ import annotations

import argparse

import torch
import transformers

from fusedrl.bench import harness
from fusedrl.bench.shapes import moe_decode_shape, random_causal_lm
from fusedrl.bench.bench_generate import time_ours
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.config import ModelConfig
from fusedrl.kernels import dispatch

def moe_model(shape: dict, layers: int, dtype: torch.dtype, device) -> CausalLM:
    """A random Qwen3-MoE CausalLM of `shape` (Qwen3MoeConfig's fields), `layers` sparse layers."""
    config = ModelConfig.from_hf(transformers.Qwen3MoeConfig(**shape, num_hidden_layers=layers))
    torch.manual_seed(0)
    # a router of std 1 spreads the tokens over the experts; the rest keeps activations O(1)
    return random_causal_lm(config, dtype, device,
                            lambda name: 1.0 if name.endswith("gate.weight") else 0.02)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="a tiny fp32 model on the CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    sizes, new_tokens = ([1, 2], 4) if args.quick else (args.batch_sizes, args.new_tokens)
    model = moe_model(moe_decode_shape(args.quick), 2, dtype, device)
    llm = LLM(model, kv_cache_memory=(1 << 24) if args.quick else (8 << 30))
    rows = []
    for batch in sizes:
        g = torch.Generator().manual_seed(batch)
        shape = (batch, args.prompt_len)
        prompts = torch.randint(0, model.config.vocab_size, shape, generator=g).tolist()
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        time_ours(llm, prompts, params)  # warm-up: graphs captured, kernels compiled
        _, decode_s, decode_tokens, _ = time_ours(llm, prompts, params)
        steps = decode_tokens / batch
        rows.append(dict(batch=batch, decode_tok_s=decode_tokens / decode_s,
                         ms_per_step=1e3 * decode_s / steps))
        row = rows[-1]
        print(f"batch {batch}: {row['decode_tok_s']:.0f} decode tokens/s, "
              f"{row['ms_per_step']:.2f} ms/step", flush=True)
    probe = torch.empty(0, device=device, dtype=dtype)
    report = dict(meta=harness.run_metadata(device),
                  shape="Qwen3-30B-A3B layers x2" if not args.quick else "tiny",
                  dtype=str(dtype).removeprefix("torch."),
                  grouped_gemm=dispatch.grouped_gemm_path(probe),
                  cuda_graphs=llm.runner.graphs is not None, prompt_len=args.prompt_len,
                  new_tokens=new_tokens, rows=rows)
    print(f"grouped GEMM path: {report['grouped_gemm']}; decode graphs: {report['cuda_graphs']}")
    if args.out:
        harness.write_json(args.out, report)


if __name__ == "__main__":
    main()
