"""Memory traffic of one decode step of `fusedrl.engine.LLM`, next to the floor a perfect engine
must move, attributed to inputs / embedding / each layer / final norm / LM head / sampler, plus
host syncs per step.

Shape: a Qwen2.5-0.5B-shaped model (hidden 896, 14 heads over 2 KV heads of 64, MLP 4864, vocab
151936, tied embedding, bf16) with --layers layers (2 by default on the CPU), batch 128, prompts of
--prompt tokens; the decode step after the prefill is counted. Layers are extrapolated to the real
24 from their mean. Floor: every weight once + the KV cache read (each sequence's context) + the
new KV written. On the CPU the engine runs its torch paths (paged attention gathers pages, RMSNorm
and RoPE are several ops): the counted bytes are those paths'; on GPU tensors (bench/gpu.sh) they
are the fused paths', the figure to divide by a measured step time.

    python bench/traffic.py [--json OUT.json] [--table OUT.md] [--batch 128] [--layers 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traffic_count import TrafficCounter  # noqa: E402

REAL_LAYERS = 24
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, max_model_len=1024,
                  tie_word_embeddings=True, qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False,
                  rope_theta=1e6)


def qwen_like(layers: int, dtype: torch.dtype, device: str, **overrides) -> CausalLM:
    """A randomly initialized model of Qwen2.5-0.5B's shapes (the bytes do not depend on the values)."""
    model = CausalLM(ModelConfig(**{**QWEN25_05B, "num_layers": layers, **overrides}), dtype).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


def decode_step(llm: LLM, batch: int, prompt: int) -> tuple[TrafficCounter, list]:
    """Prefill `batch` prompts uncounted, then count the first decode step. Returns the counter and
    the decoded sequences."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)
    for i in range(batch):
        llm._add([10 + (i + j) % 1000 for j in range(prompt)], params, 0)
    counter = TrafficCounter()
    body = llm.model.model
    modules = {"embedding": body.embed_tokens, **{f"layer {i}": layer for i, layer in enumerate(body.layers)},
               "final norm": body.norm, "LM head": llm.model.lm_head}
    while True:
        seqs, is_prefill = llm.scheduler.schedule()
        if not is_prefill:
            break
        llm.scheduler.postprocess(seqs, *llm.runner.run(seqs, True))
    counter.region = "inputs"
    handles = counter.attribute(modules, after={"LM head": "sampler"})
    try:
        with counter, counter.python_syncs():
            tokens, logprobs = llm.runner.run(seqs, False)
    finally:
        for handle in handles:
            handle.remove()
    return counter, seqs


def decode_report(batch: int, layers: int, prompt: int, dtype=torch.bfloat16, device="cpu",
                  **overrides) -> dict:
    """The report of one decode step (see the module docstring); `overrides` change the model's
    shape (tests use a tiny one)."""
    model = qwen_like(layers, dtype, device, **overrides)
    llm = LLM(model, kv_cache_memory=1 << 30, use_cuda_graphs=False, max_num_seqs=batch)
    counter, seqs = decode_step(llm, batch, prompt)
    c, elem = model.config, torch.empty(0, dtype=dtype).element_size()
    kv_token = 2 * c.num_kv_heads * c.head_dim * elem  # K and V of one token in one layer
    context = sum(s.num_tokens for s in seqs)  # tokens each sequence attends to at this step
    per_layer_weights = weight_bytes(model.model.layers[0])
    shared_weights = weight_bytes(model) - layers * per_layer_weights
    floor_layer = per_layer_weights + context * kv_token + batch * kv_token
    regions = {name: {"read": r, "written": w, "ops": counter.ops[name]} for name, (r, w) in counter.bytes.items()}
    layer_names = [n for n in regions if n.startswith("layer ")]
    mean_layer = sum(regions[n]["read"] + regions[n]["written"] for n in layer_names) / max(len(layer_names), 1)
    other = sum(v["read"] + v["written"] for n, v in regions.items() if not n.startswith("layer "))
    counted = other + REAL_LAYERS * mean_layer
    floor = shared_weights + REAL_LAYERS * floor_layer
    return {"shape": {"model": "Qwen2.5-0.5B-shaped", "dtype": str(dtype).removeprefix("torch."),
                      "batch": batch, "prompt_tokens": prompt, "counted_layers": layers,
                      "extrapolated_layers": REAL_LAYERS, "context_tokens": context, "device": device},
            "regions": regions, "per_layer": {"counted_mean": mean_layer, "floor": floor_layer},
            "total": {"counted": counted, "floor": floor, "ratio": counted / floor},
            "host_syncs": dict(counter.syncs)}


def table(report: dict) -> str:
    mib = 2 ** 20
    shape = report["shape"]
    lines = [f"Decode step, {shape['model']} {shape['dtype']}, batch {shape['batch']}, "
             f"{shape['context_tokens']} context tokens; {shape['counted_layers']} layers counted, "
             f"extrapolated to {shape['extrapolated_layers']}.", "",
             "| region | ops | read MiB | written MiB |", "|---|---|---|---|"]
    for name, v in report["regions"].items():
        lines.append(f"| {name} | {v['ops']} | {v['read'] / mib:.2f} | {v['written'] / mib:.2f} |")
    per, total = report["per_layer"], report["total"]
    lines += ["", f"per layer: counted {per['counted_mean'] / mib:.2f} MiB, floor {per['floor'] / mib:.2f} MiB",
              f"step: counted {total['counted'] / mib:.1f} MiB, floor {total['floor'] / mib:.1f} MiB, "
              f"ratio {total['ratio']:.2f}",
              "host syncs per step: " + (", ".join(f"{k} {n}" for k, n in sorted(report["host_syncs"].items()))
                                         or "none")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    report = decode_report(args.batch, args.layers, args.prompt, device=args.device)
    text = table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.table:
        args.table.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
