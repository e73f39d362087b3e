"""Prefix sharing (train.prefix_sharing): tokens forwarded and modeled FLOPs of one GRPO iteration's
training-side forwards, with and without sharing, for group sizes 4-16 and prompt/answer ratios
0.1-10 (a long shared history, as in agent trajectories, is the high end).

Counted on the CPU from the engine's own layout: each case packs its rows with pack_rollout and
reads the forward's segments from share_prefixes (the token stream, and each segment's queries and
keys, hence the attention's query-key pairs). Modeled FLOPs per forward: 2 x the decoder's weight
GEMMs per forwarded token, 4 x head_dim x heads per causal query-key pair, the LM head at the
answer tokens only (where the log-probs are read); an iteration runs the reference and old log-prob
forwards and the update's forward and backward (2 x forward): 5 forwards' worth (one PPO epoch).
`--verify` runs a tiny model's forward under torch's FlopCounterMode on both layouts and reports
its counted FLOPs over the modeled GEMM FLOPs.

    python bench/bench_prefix_sharing.py          # Qwen2.5-7B shapes, 8 groups, 1024-token answers
    python bench/bench_prefix_sharing.py --quick    # fewer cases, with --verify
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from fusedrl.bench import harness
from fusedrl.engine.data.prefix_sharing import share_prefixes
from fusedrl.engine.stages.rollout.packs import pack_rollout

FORWARDS_PER_ITERATION = 5  # reference + old log-probs + the update's forward and backward (2x)
# What the FLOPs in the result are (its "modeled" field); the tokens are counted.
MODELED = "FLOPs from the decoder's GEMM and attention formulas (verify: counted on a tiny model)"


@dataclass(frozen=True)
class Shape:
    """The decoder shapes the FLOPs are modeled from."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def gemm_flops_per_token(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.layers * self.hidden * (q + 2 * kv + q + 3 * self.intermediate)

    def attention_flops_per_pair(self) -> int:
        return 4 * self.layers * self.heads * self.head_dim  # q.k and p.v, per query-key pair


QWEN25_7B = Shape(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
                  vocab=152064)
TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=300)


def segments(groups: int, group: int, prompt: int, answer: int,
             share: bool) -> tuple[list[int], list[int], int]:
    """(queries, keys of each segment, targets) of a forward over `groups` groups of `group` rows
    of `prompt` + `answer` tokens, from the engine's packing."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (prompt,), generator=g).tolist() for _ in range(groups)]
    rows = [p for p in prompts for _ in range(group)]
    answers = [torch.randint(10, 1000, (answer,), generator=g).tolist() for _ in rows]
    packed = pack_rollout(rows, answers, "cpu", share_prompts=share)
    layout = share_prefixes(packed)
    if layout is None:
        return packed.seqlens, packed.seqlens, packed.num_targets
    return layout.seqlens_q, layout.seqlens_k, packed.num_targets


def causal_pairs(queries: list[int], keys: list[int]) -> int:
    """Query-key pairs attention computes: each query sees the keys before its segment and those of
    its segment up to itself."""
    return sum(q * (k - q) + q * (q + 1) // 2 for q, k in zip(queries, keys))


def iteration_cost(shape: Shape, groups: int, group: int, prompt: int, answer: int,
                   share: bool) -> dict:
    queries, keys, targets = segments(groups, group, prompt, answer, share)
    tokens = sum(queries)
    forward = (tokens * shape.gemm_flops_per_token()
               + causal_pairs(queries, keys) * shape.attention_flops_per_pair()
               + targets * 2 * shape.hidden * shape.vocab)
    return {"tokens_forwarded": FORWARDS_PER_ITERATION * tokens,
            "flops": FORWARDS_PER_ITERATION * forward, "forward_flops": forward}


def verify(group: int, prompt: int, answer: int) -> dict:
    """A tiny model's decoder forward under FlopCounterMode on both layouts: its counted FLOPs and
    the modeled GEMM FLOPs (the mode counts the GEMMs; it has no formula for the CPU's SDPA kernel,
    so the attention term stays modeled only)."""
    import transformers
    from fusedrl.engine.model.causal_lm import CausalLM
    from fusedrl.engine.model.config import ModelConfig
    hf = transformers.LlamaConfig(hidden_size=TINY.hidden, intermediate_size=TINY.intermediate,
                                  num_hidden_layers=TINY.layers, num_attention_heads=TINY.heads,
                                  num_key_value_heads=TINY.kv_heads, vocab_size=TINY.vocab,
                                  max_position_embeddings=4096)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(hf))
    out = {}
    for share in (False, True):
        rows = [list(range(10, 10 + prompt))] * group
        answers = [[11 + k] * answer for k in range(group)]
        packed = pack_rollout(rows, answers, "cpu", share_prompts=share)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_rows(packed)
        queries, _, _ = segments(1, group, prompt, answer, share)
        out["shared" if share else "whole"] = {
            "counted_flops": counter.get_total_flops(),
            "modeled_flops": sum(queries) * TINY.gemm_flops_per_token()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer cases and --verify")
    p.add_argument("--verify", action="store_true",
                   help="check the FLOP model on a tiny model's forward")
    p.add_argument("--groups", type=int, default=8, help="groups (prompts) per iteration")
    p.add_argument("--answer", type=int, default=1024, help="answer tokens per row")
    p.add_argument("--out", default=None,
                   help="JSON path (default: bench/results/prefix_sharing[_quick].json)")
    args = p.parse_args(argv)
    sizes, ratios = ((4, 16), (0.1, 10)) if args.quick else ((4, 8, 16), (0.1, 0.3, 1, 3, 10))
    answer = 32 if args.quick else args.answer
    rows = []
    for group in sizes:
        for ratio in ratios:
            prompt = max(1, round(ratio * answer))
            whole, shared = (iteration_cost(QWEN25_7B, args.groups, group, prompt, answer, s)
                             for s in (False, True))
            rows.append({
                "group": group, "prompt": prompt, "answer": answer, "prompt_per_answer": ratio,
                "tokens_whole": whole["tokens_forwarded"],
                "tokens_shared": shared["tokens_forwarded"],
                "token_ratio": whole["tokens_forwarded"] / shared["tokens_forwarded"],
                "tflops_whole": whole["flops"] / 1e12, "tflops_shared": shared["flops"] / 1e12,
                "flop_ratio": whole["flops"] / shared["flops"]})
    print(harness.format_table(rows, [
        ("group", "n"), ("prompt", "prompt"), ("answer", "answer"),
        ("tokens_whole", "tokens (whole)"), ("tokens_shared", "tokens (shared)"),
        ("token_ratio", "x tokens"), ("tflops_whole", "TFLOP (whole)"),
        ("tflops_shared", "TFLOP (shared)"), ("flop_ratio", "x FLOPs")]))
    payload = {"meta": harness.run_metadata(torch.device("cpu")), "modeled": MODELED,
               "shape": asdict(QWEN25_7B),
               "groups": args.groups, "forwards_per_iteration": FORWARDS_PER_ITERATION,
               "results": rows}
    if args.verify or args.quick:
        payload["verify"] = verify(group=4, prompt=24, answer=8)
        for name, v in payload["verify"].items():
            ratio = v["counted_flops"] / v["modeled_flops"]
            print(f"verify {name}: counted / modeled FLOPs = {ratio:.3f}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"prefix_sharing{'_quick' if args.quick else ''}.json")
    harness.write_json(out, payload)
    return payload


if __name__ == "__main__":
    main()
