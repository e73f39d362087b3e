"""The rollout's long tail, modeled: synchronous rollouts vs partial rollouts vs partial rollouts
with speculative decoding of the tail, for Qwen2.5-7B GRPO on one H100. Runs on the CPU.

Response lengths are long-tailed: log-normal with median --median (4096) and sigma --sigma (0.8),
cut at --max-new-tokens (16384): a median of ~4k tokens under a 16k cap, the shape long
chain-of-thought RL reports (DAPO, Yu et al. 2025, Fig. 7; Kimi k1.5, 2025, sec. 2.6.1: most answers
far below the cap, a few at it). The parameters are this benchmark's assumption, not a measurement.

The lengths are replayed through the engine's own Scheduler and BlockManager (continuous batching,
paged KV, preemption, speculative slot reservation and rollback) with a stand-in model that ends
each answer at its drawn length; partial rollouts follow the trainer's rules (stages/rollout/partial.py:
groups in flight topped up to 2 x --prompts, the iteration ended at --prompts complete groups (or a
token budget), answers carried and prefilled again, stale answers dropped); the engine runs at most
RolloutConfig.max_rows rows at once (--prompts x --samples, twice that with partial rollouts).
Each step's time is modeled for Qwen2.5-7B in bf16 on an H100:
    decode / verify step: (weights + the KV the batch reads) / copy bandwidth, 2.96 TB/s measured
        (/work/shared/gpu-runs/2026-11-23-h100/README.md: 2.94-3.00 TB/s);
    prefill: (2 x parameters + attention) FLOPs per token / 792 TFLOP/s (the bf16 matmul measured
        there), plus one read of the weights.
Speculation on steps of fewer than --speculate-below rows drafts --speculative-tokens tokens a row,
each accepted with probability --acceptance (an assumed rate for n-gram drafts on reasoning text),
a step costing the larger of its bytes over the copy bandwidth and its tokens' FLOPs (drafts
included) over the matmul rate. The figure is rollout time per trained token (tokens of groups
that enter training; a dropped answer's tokens are waste).

    python bench/bench_long_tail.py [--iterations 4] [--out bench/results/long_tail.json]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

from fusedrl.bench import harness
from fusedrl.engine.inference.block_manager import BlockManager
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.scheduler import Scheduler, StepKind
from fusedrl.engine.inference.sequence import Sequence
from fusedrl.engine.inference.stop_rules import GroupsDone
from fusedrl.engine.inference.in_flight import Group, unfinished
from fusedrl.engine.stages.rollout.partial import drop_stale, new_groups_wanted

# Qwen2.5-7B: 7.616B parameters in bf16; K and V of 28 layers x 4 kv heads x 128 per token.
PARAMS, WEIGHT_BYTES, LAYERS, HIDDEN = 7.616e9, 15.23e9, 28, 3584
KV_PER_TOKEN = 2 * 28 * 4 * 128 * 2
COPY_BW, MATMUL_FLOPS = 2.96e12, 792e12
# What the seconds in the result are (its "modeled" field): not a measurement.
MODELED = ("seconds of Qwen2.5-7B bf16 on one H100, modeled from bytes / 2.96 TB/s and FLOPs / 792 "
           "TFLOP/s (rates measured on an H100); the schedule is the engine's, replayed on the CPU")
EOS, PROMPT_TOKEN = 2, 3


class StandIn:
    """A stand-in model over a real Scheduler: each answer ends (EOS) at its drawn length; each
    sequence writes its own token id (no block is shared past the prompt). Accumulates the steps'
    counts and modeled seconds."""

    def __init__(self, args, rng: random.Random, rows: int):
        """rng: the acceptance draws; rows: the engine's max_num_seqs."""
        self.args, self.rng = args, rng
        self.blocks = BlockManager(args.pool_tokens // args.block_size, args.block_size)
        self.scheduler = Scheduler(self.blocks, rows, 16384, 32768, (EOS,))
        self.counts = dict(decode_steps=0, verify_steps=0, rows=0, prefill_tokens=0, drawn_tokens=0,
                           seconds=0.0)

    def next_tokens(self, seq: Sequence, target: int, count: int) -> list[int]:
        """Up to `count` tokens of `seq`'s answer, EOS at its `target` length."""
        done = seq.num_tokens - seq.num_prompt_tokens
        out = [10 + seq.seq_id] * min(count, target - done)
        return out[:-1] + [EOS] if done + len(out) == target else out

    def run(self, rows: list[tuple[Sequence, int]], budget: int | None, speculate: bool,
            stop=None) -> None:
        """Step until every row is done, `budget` tokens were drawn or stop(the rows ended, tokens
        drawn) (then Scheduler.abort), as LLM.run does."""
        target = {seq.seq_id: t for seq, t in rows}
        index = {seq.seq_id: i for i, (seq, _) in enumerate(rows)}
        for seq, _ in rows:
            self.scheduler.add(seq)
        drawn = 0
        while not self.scheduler.is_finished():
            batch, kind = self.scheduler.schedule()
            if kind is StepKind.PREFILL:  # no prompt here is long enough for a CHUNK
                tokens = [self.next_tokens(s, target[s.seq_id], 1) for s in batch]
                self.prefill(batch)
            else:
                tokens = self.decode(batch, target, speculate)
            drawn += sum(map(len, tokens))
            finished = self.scheduler.postprocess(batch, tokens)
            ended = [index[s.seq_id] for s in finished]
            if (budget is not None and drawn >= budget) or (stop and stop(ended, 0)):
                self.scheduler.abort()
        self.counts["drawn_tokens"] += drawn

    def prefill(self, batch: list[Sequence]) -> None:
        flops = 0.0
        for s in batch:
            new = s.num_tokens - s.num_cached_tokens
            flops += 2 * PARAMS * new + 4 * LAYERS * HIDDEN * new * (s.num_cached_tokens + new / 2)
            self.counts["prefill_tokens"] += new
        self.counts["seconds"] += flops / MATMUL_FLOPS + WEIGHT_BYTES / COPY_BW

    def decode(self, batch: list[Sequence], target: dict, speculate: bool) -> list[list[int]]:
        a = self.args
        spec = speculate and len(batch) < a.speculate_below
        tokens, fed = [], len(batch)
        for s in batch:
            want = 1
            if spec:  # drafts accepted each with probability a.acceptance, until one is not
                left = target[s.seq_id] - (s.num_tokens - s.num_prompt_tokens) - 1
                k = min(a.speculative_tokens, left)
                k = min(k, self.blocks.reserve(s, s.num_tokens + max(k, 0)) - s.num_tokens)
                accepted = 0
                while accepted < k and self.rng.random() < a.acceptance:
                    accepted += 1
                want, fed = accepted + 1, fed + max(k, 0)
            tokens.append(self.next_tokens(s, target[s.seq_id], want))
        kv = sum(s.num_tokens for s in batch) * KV_PER_TOKEN
        # Memory-bound (weights and KV read once a step) until the tokens fed outweigh it in FLOPs.
        self.counts["seconds"] += max((WEIGHT_BYTES + kv) / COPY_BW,
                                      2 * PARAMS * fed / MATMUL_FLOPS)
        self.counts["verify_steps" if spec else "decode_steps"] += 1
        self.counts["rows"] += len(batch)
        return tokens


def lengths(args, rng: random.Random, n: int) -> list[int]:
    draws = (rng.lognormvariate(math.log(args.median), args.sigma) for _ in range(n))
    return [max(1, min(args.max_new_tokens, round(x))) for x in draws]


def synchronous(args, seed: int) -> dict:
    rng = random.Random(seed)
    model = StandIn(args, random.Random(seed + 1), args.prompts * args.samples)
    trained, next_id = 0, 0
    for _ in range(args.iterations):
        rows = []
        for length in lengths(args, rng, args.prompts * args.samples):
            prompt = [PROMPT_TOKEN] * args.prompt_tokens
            rows.append((Sequence(next_id, Request(prompt, PARAMS_OF(args)), 0), length))
            next_id += 1
        model.run(rows, None, speculate=False)
        trained += sum(t for _, t in rows)
    return {**model.counts, "trained_tokens": trained}


def PARAMS_OF(args) -> SamplingParams:  # noqa: N802 (a constant per run)
    return SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=False)


def partial(args, seed: int, speculate: bool) -> dict:
    """Partial rollouts until as many groups trained as the synchronous run trains."""
    rng = random.Random(seed)
    # The lengths' stream apart from the acceptance draws: the same answers with or without
    # speculation.
    model = StandIn(args, random.Random(seed + 1), 2 * args.prompts * args.samples)
    groups, trained, next_id, it = [], 0, 0, 0
    length_of = {}  # id(sample) -> the length its answer ends at
    dropped = dropped_tokens = groups_trained = 0
    while groups_trained < args.iterations * args.prompts:
        answers, tokens = drop_stale(groups, it, args.max_staleness)
        dropped, dropped_tokens = dropped + answers, dropped_tokens + tokens
        for _ in range(new_groups_wanted(len(groups), args.prompts)):
            group = Group.new([PROMPT_TOKEN] * args.prompt_tokens, args.samples,
                              rng.getrandbits(32))
            for sample, length in zip(group.samples, lengths(args, rng, args.samples)):
                length_of[id(sample)] = length
            groups.append(group)
        rows = []
        index = {id(g): i for i, g in enumerate(groups)}
        for group, sample in unfinished(groups):
            seq = Sequence(next_id, Request(group.prompt, PARAMS_OF(args), answer=sample.tokens), 0)
            rows.append((seq, index[id(group)], sample))
            next_id += 1
        needed = args.prompts - sum(g.complete for g in groups)
        if needed > 0:
            model.run([(seq, length_of[id(sample)]) for seq, _, sample in rows],
                      args.tokens_per_iteration, speculate,
                      GroupsDone([g for _, g, _ in rows], needed))
        for seq, _, sample in rows:
            new = seq.completion_token_ids[len(sample.tokens):]
            sample.tokens += new
            sample.versions += [it] * len(new)
            sample.finish = "stop" if len(sample.tokens) == length_of[id(sample)] else None
        done = [g for g in groups if g.complete][:args.prompts]
        groups = [g for g in groups if not any(g is d for d in done)]
        groups_trained += len(done)
        trained += sum(len(s.tokens) for g in done for s in g.samples)
        it += 1
    return {**model.counts, "trained_tokens": trained, "iterations": it, "dropped_answers": dropped,
            "dropped_tokens": dropped_tokens}


def summarize(name: str, r: dict) -> dict:
    steps = r["decode_steps"] + r["verify_steps"]
    r.update(mode=name, seconds_per_trained_token=r["seconds"] / r["trained_tokens"],
             mean_batch=r["rows"] / max(steps, 1))
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="groups per iteration on the GPU")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=16384)
    p.add_argument("--median", type=float, default=4096)
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--iterations", type=int, default=6,
                   help="synchronous iterations (partial: as many groups)")
    p.add_argument("--tokens-per-iteration", type=int, default=None,
                   help="partial rollouts' token budget (default: none, an iteration ends at "
                        "--prompts complete groups)")
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--speculative-tokens", type=int, default=4)
    p.add_argument("--speculate-below", type=int, default=32)
    p.add_argument("--acceptance", type=float, default=0.5,
                   help="assumed acceptance rate of a drafted token")
    p.add_argument("--pool-tokens", type=int, default=644400,
                   help="KV pool in tokens (the plan's auto pool of Qwen2.5-7B GRPO on 8 x 80 GB)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/long_tail.json")
    args = p.parse_args(argv)
    runs = [summarize("synchronous", synchronous(args, args.seed)),
            summarize("partial", partial(args, args.seed, speculate=False)),
            summarize("partial+speculative", partial(args, args.seed, speculate=True))]
    sync = runs[0]["seconds_per_trained_token"]
    for r in runs:
        r["relative_time_per_token"] = r["seconds_per_trained_token"] / sync
        print(f"{r['mode']:>20}: {r['seconds_per_trained_token'] * 1e6:8.2f} us/token, "
              f"{r['decode_steps']} decode + {r['verify_steps']} verify steps, "
              f"mean batch {r['mean_batch']:.1f}, "
              f"{r['prefill_tokens']} prefill tokens, x{r['relative_time_per_token']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"meta": harness.run_metadata(torch.device("cpu")), "modeled": MODELED,
                          "settings": vars(args), "runs": runs}, indent=1)
    out.write_text(payload + "\n", encoding="utf-8")
    print(f"long tail: partial+speculative / synchronous modeled time per token = "
          f"{runs[2]['relative_time_per_token']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
