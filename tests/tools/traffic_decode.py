"""Memory traffic of one decode step of `fusedrl.engine.LLM` on the path a GPU runs, next to the
floor a perfect engine must move, attributed to inputs / embedding / each layer / final norm / LM
head / sampler, plus host syncs per step.

Shape: a Qwen2.5-0.5B-shaped model (hidden 896, 14 heads over 2 KV heads of 64, MLP 4864, vocab
151936, tied embedding, bf16) with `layers` layers, `batch` sequences of `context` tokens each
(the prompt and the token being fed), sampled at temperature 1 with `top_p`. Layers are
extrapolated to the real 24 from their mean. Floor: every weight once + the KV cache read (each
sequence's context) + the new KV written.

The GPU path is the Triton one (`kernels.use_backend("triton")`; on the CPU under
TRITON_INTERPRET=1): the decode norm + GEMM (up to 16 rows; more take the norm, cuBLAS's GEMM and
SiLU * up apart), RoPE + store + paged decode, add+RMSNorm and the sampler are each one custom op, counted by traffic_count's rules. On the CPU the results of the ops
too slow to interpret at this shape are computed by their torch oracles (ORACLES; measured
interpreted: the sampler ~30 s a row at top-p 0.9, paged decode ~80 s a layer at context 256, the
norm + GEMM's tiles one by one); each is still counted as its fused
op, whose bytes depend on its arguments and results only (tests/bench/test_traffic.py checks that the
counts with and without the oracles are equal at a small shape). The prefill is not run: the KV pages
are filled with random values (a decode step's bytes do not depend on them).
"""
from __future__ import annotations

import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.runner import kv_bytes_per_block
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.scheduler import StepKind
from fusedrl.engine.model.primitives import FUSED_NORM_LINEAR_ROWS
from fusedrl.kernels.invariant import fixed_order as invariant_ops
from fusedrl.kernels.invariant.chunked_attention import chunked_attention
from fusedrl.kernels import reference, use_backend

from fusedrl.bench.shapes import qwen_like
from fusedrl.bench.traffic_count import TrafficCounter, weight_bytes
from value_checks import value_checks_as_on_gpu

REAL_LAYERS = 24
# The budget: kernels launched by a decode step, per layer and outside the layers (a fused custom
# op counts as one; the step's host-to-device input copies, region "inputs", are transfers, not kernels).
KERNELS_OUTSIDE_LAYERS = 6


def kernels_per_layer(batch: int) -> int:
    """The per-layer budget: 5 up to primitives.FUSED_NORM_LINEAR_ROWS rows (each norm one kernel
    with the projection after it), 8 beyond (the norms, q/k/v's and gate/up's GEMMs and SiLU * up
    each its own)."""
    return 5 if batch <= FUSED_NORM_LINEAR_ROWS else 8
BLOCK_SIZE = 16
# Torch oracles of the fused ops too slow to interpret at full shape (see the module docstring).
ORACLES = {"fusedrl::sample": lambda *args: reference.sample(*args[:7]),  # all but the key windows
           "fusedrl::rope_store_decode": lambda *args: reference.rope_store_decode(*args[:12]),
           "fusedrl::norm_linear": lambda x, residual, *args: tuple(
               t.clone() for t in reference.norm_linear(x, residual, *args))}
# The exact mode's own kernels: the CPU's fixed-order ops compute the same functions (not the same bits,
# which the bytes do not depend on).
EXACT_ORACLES = {
    "fusedrl::fixed_tile_linear": lambda x, w, bias, out_dtype: invariant_ops.linear(x, w, bias, out_dtype),
    "fusedrl::segment_attention": lambda q, k, v, positions, seq_index, table, page, *_: chunked_attention(
        q, k, v, positions, seq_index, table, page),
    "fusedrl::row_logprobs": lambda logits, tokens, temperatures: invariant_ops.token_logprobs(
        logits, tokens, temperatures, True)}


def decode_batch(llm: LLM, batch: int, context: int, top_p: float) -> list:
    """`batch` sequences with `context - 1` prompt tokens and one generated token, their KV pages
    allocated and filled with random values: the batch of the next decode step."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=top_p, seed=0)
    for i in range(batch):
        ids = [10 + (i + j) % min(1000, llm.config.vocab_size - 10) for j in range(context - 1)]
        llm.add(Request(ids, params))
    while True:
        seqs, kind = llm.scheduler.schedule()
        if kind is StepKind.DECODE:
            break
        llm.scheduler.postprocess(seqs, [11] * len(seqs))
    llm.runner.kv_pool.normal_()
    return seqs


def count_step(llm: LLM, seqs: list, stand_ins: dict) -> TrafficCounter:
    """Count one decode step of `seqs`, attributed to the model's parts."""
    counter = TrafficCounter(stand_ins)
    body = llm.model.model
    modules = {"embedding": body.embed_tokens, **{f"layer {i}": layer for i, layer in enumerate(body.layers)},
               "final norm": body.norm, "LM head": llm.model.lm_head}
    counter.region = "inputs"
    handles = counter.attribute(modules, after={"LM head": "sampler"})
    try:
        with counter, counter.python_syncs(), value_checks_as_on_gpu():
            llm.runner.run(seqs, False)
    finally:
        for handle in handles:
            handle.remove()
    return counter


def counted_step(batch: int, layers: int, context: int, top_p: float = 1.0, path: str = "triton",
                 dtype=torch.bfloat16, device="cpu", oracles: bool = True, exact: bool = False, **overrides):
    """(model, the step's sequences, its TrafficCounter, the stand-ins used) of one decode step of a
    `layers`-layer model, in the exact mode (`LLM(batch_invariant=True)`) when `exact`."""
    model = qwen_like(layers, dtype, device, **overrides)
    pool = batch * (-(-context // BLOCK_SIZE) + 1) * kv_bytes_per_block(model.config, dtype, BLOCK_SIZE)
    llm = LLM(model, kv_cache_memory=pool, block_size=BLOCK_SIZE, use_cuda_graphs=False, max_num_seqs=batch,
              batch_invariant=exact)
    stand_ins = {**ORACLES, **(EXACT_ORACLES if exact else {})} if oracles and path == "triton" and device == "cpu" \
        else {}
    with use_backend(path):
        seqs = decode_batch(llm, batch, context, top_p)
        return model, seqs, count_step(llm, seqs, stand_ins), stand_ins


def decode_report(batch: int, layers: int, context: int, top_p: float = 1.0, path: str = "triton",
                  dtype=torch.bfloat16, device="cpu", oracles: bool = True, **overrides) -> dict:
    """The report of one decode step (see the module docstring). path: "triton" (the GPU path) or
    "torch" (the CPU fallback); oracles: on the CPU, compute the slow fused ops' results with
    ORACLES; `overrides` change the model's shape (tests use a tiny one)."""
    model, seqs, counter, stand_ins = counted_step(batch, layers, context, top_p, path, dtype, device, oracles,
                                                   **overrides)
    c = model.config
    elem = torch.empty(0, dtype=dtype).element_size()
    kv_token = 2 * c.num_kv_heads * c.head_dim * elem  # K and V of one token in one layer
    tokens = sum(s.num_tokens for s in seqs)  # tokens the batch attends to at this step
    per_layer_weights = weight_bytes(model.model.layers[0])
    shared_weights = weight_bytes(model) - layers * per_layer_weights
    floor_layer = per_layer_weights + tokens * kv_token + batch * kv_token
    regions = {name: {"read": r, "written": w, "ops": counter.ops[name], "kernels": counter.kernels[name]}
               for name, (r, w) in counter.bytes.items()}
    layer_names = [n for n in regions if n.startswith("layer ")]
    kernels = {"per_layer": max(regions[n]["kernels"] for n in layer_names),
               "outside_layers": sum(v["kernels"] for n, v in regions.items() if n not in layer_names + ["inputs"]),
               "host_to_device_copies": regions.get("inputs", {}).get("kernels", 0)}
    mean_layer = sum(regions[n]["read"] + regions[n]["written"] for n in layer_names) / max(len(layer_names), 1)
    other = sum(v["read"] + v["written"] for n, v in regions.items() if not n.startswith("layer "))
    counted = other + REAL_LAYERS * mean_layer
    floor = shared_weights + REAL_LAYERS * floor_layer
    return {"shape": {"model": "Qwen2.5-0.5B-shaped", "dtype": str(dtype).removeprefix("torch."),
                      "batch": batch, "context": context, "top_p": top_p, "temperature": 1.0,
                      "counted_layers": layers, "extrapolated_layers": REAL_LAYERS, "context_tokens": tokens,
                      "device": device, "path": path, "oracles": sorted(stand_ins)},
            "regions": regions, "per_layer": {"counted_mean": mean_layer, "floor": floor_layer},
            "total": {"counted": counted, "floor": floor, "ratio": counted / floor},
            "kernels": kernels, "host_syncs": dict(counter.syncs)}


def decode_table(report: dict) -> str:
    """Markdown: the region table of one decode report and its totals."""
    mib = 2 ** 20
    shape = report["shape"]
    lines = [f"Decode step ({shape['path']} path), {shape['model']} {shape['dtype']}, batch {shape['batch']}, "
             f"context {shape['context']} ({shape['context_tokens']} tokens), top-p {shape['top_p']}; "
             f"{shape['counted_layers']} layers counted, extrapolated to {shape['extrapolated_layers']}.", "",
             "| region | ops | kernels | read MiB | written MiB |", "|---|---|---|---|---|"]
    for name, v in report["regions"].items():
        lines.append(f"| {name} | {v['ops']} | {v['kernels']} | {v['read'] / mib:.2f} | {v['written'] / mib:.2f} |")
    per, total, kernels = report["per_layer"], report["total"], report["kernels"]
    lines += ["", f"per layer: counted {per['counted_mean'] / mib:.2f} MiB, floor {per['floor'] / mib:.2f} MiB",
              f"step: counted {total['counted'] / mib:.1f} MiB, floor {total['floor'] / mib:.1f} MiB, "
              f"ratio {total['ratio']:.2f}",
              f"kernels: {kernels['per_layer']} per layer (budget {kernels_per_layer(shape['batch'])}), "
              f"{kernels['outside_layers']} outside the layers (budget {KERNELS_OUTSIDE_LAYERS}), plus "
              f"{kernels['host_to_device_copies']} host-to-device input copies",
              "host syncs per step: " + syncs_text(report["host_syncs"])]
    return "\n".join(lines) + "\n"


def syncs_text(syncs: dict) -> str:
    """"tolist 1, ..." of a step's host syncs, or "none"."""
    return ", ".join(f"{k} {n}" for k, n in sorted(syncs.items())) or "none"


def exact_mode_report(batch: int, context: int, top_p: float = 1.0, dtype=torch.bfloat16, device="cpu",
                      oracles: bool = True, **overrides) -> dict:
    """The exact mode's decode step next to the default's, counted the same way for both: the exact
    walk calls no layer module, so a layer's bytes are the difference between a 2-layer and a
    1-layer model's step, and the step is the 1-layer step plus 23 more layers."""
    modes = {}
    for name, exact in (("default", False), ("exact", True)):
        totals, syncs = [], {}
        for layers in (1, 2):
            _, _, counter, _ = counted_step(batch, layers, context, top_p, "triton", dtype, device, oracles,
                                            exact=exact, **overrides)
            totals.append(sum(r + w for r, w in counter.bytes.values()))
            syncs = dict(counter.syncs)
        per_layer = totals[1] - totals[0]
        modes[name] = {"per_layer": per_layer, "rest": totals[0] - per_layer,
                       "step": totals[0] + (REAL_LAYERS - 1) * per_layer, "host_syncs": syncs}
    return {"shape": {"model": "Qwen2.5-0.5B-shaped", "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                      "context": context, "top_p": top_p, "extrapolated_layers": REAL_LAYERS, "device": device},
            "modes": modes, "exact_over_default": modes["exact"]["step"] / modes["default"]["step"]}


def exact_mode_table(report: dict) -> str:
    """Markdown: the two modes' counted decode steps."""
    mib = 2 ** 20
    shape = report["shape"]
    lines = [f"Exact mode vs default, decode step, {shape['model']} {shape['dtype']}, batch {shape['batch']}, "
             f"context {shape['context']}, top-p {shape['top_p']}; layers extrapolated to "
             f"{shape['extrapolated_layers']} from a 2-layer minus a 1-layer step.", "",
             "| mode | per layer MiB | rest MiB | step MiB | host syncs |", "|---|---|---|---|---|"]
    for name, m in report["modes"].items():
        lines.append(f"| {name} | {m['per_layer'] / mib:.2f} | {m['rest'] / mib:.2f} | {m['step'] / mib:.1f} | "
                     f"{syncs_text(m['host_syncs'])} |")
    lines += ["", f"exact / default bytes per step: {report['exact_over_default']:.3f}"]
    return "\n".join(lines) + "\n"
