"""Partial rollouts (rollout.partial_rollouts; Kimi k1.5's, verl's partial_rollout): a rollout that
stops at a token budget instead of waiting for its longest answer.

An iteration keeps prompts_per_iteration groups in flight on each rank: the groups carried from
before, topped up with new prompts. It decodes every unfinished answer (the carried ones prefilled
again, under the current weights) until they are all done or rollout.tokens_per_iteration tokens
are decoded; the unfinished keep their tokens, the sampler's log-prob of each and the iteration
(policy version) that drew it, and free their KV. A group trains once all its samples are done
(ranks train as many as the rank with fewest: the rest wait); the IS correction (ppo.is_mode, tis
by default here) weights each token by its own sampler log-prob. Before each iteration an answer
(finished or not) whose oldest token would train more than rollout.max_staleness iterations after
it was drawn is dropped and sampled again from its prompt (counted), so no trained token is older.

The groups in flight are plain lists and numbers in the loop state (`PPOState.in_flight`, saved in
every checkpoint), so a resumed run continues exactly as the uninterrupted one: each sample draws
from its own seed's stream at its own positions (LLM.continue_answers).
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from ... import distributed
from ...config.ppo import RolloutConfig
from ...inference.sampling_params import SamplingParams
from .models import PPOModels
from .phase_timer import PhaseTimer
from .samples import Samples
from .sampling import score_samples
from .state import PPOState


def token_budget(r: RolloutConfig) -> int:
    """rollout.tokens_per_iteration, by default a quarter of the rows' full-length answers."""
    return r.tokens_per_iteration or max(1, r.prompts_per_iteration * r.samples_per_prompt * r.max_new_tokens // 4)


def new_group(prompt: list[int], n: int, seed: int) -> dict:
    """A group in flight: its prompt and n empty samples, each with its own sampling seed."""
    rng = random.Random(seed)
    return {"prompt": list(prompt), "samples": [
        {"answer": [], "logprobs": [], "versions": [], "finish": None, "seed": rng.getrandbits(63)}
        for _ in range(n)]}


def drop_stale(groups: list[dict], iteration: int, max_staleness: int) -> tuple[int, int]:
    """Reset every sample whose oldest token would be more than max_staleness iterations old if it
    trained at `iteration` (it is sampled again from its prompt, same seed). Returns (answers, tokens)
    dropped."""
    answers = tokens = 0
    for group in groups:
        for sample in group["samples"]:
            if sample["versions"] and iteration - min(sample["versions"]) > max_staleness:
                answers, tokens = answers + 1, tokens + len(sample["answer"])
                sample.update(answer=[], logprobs=[], versions=[], finish=None)
    return answers, tokens


def partial_samples(models: PPOModels, state: PPOState, draw_prompts: Callable[[int], list[list[int]]],
                    r: RolloutConfig, seed: int, timer: PhaseTimer) -> tuple[Samples | None, dict]:
    """This iteration's complete groups (None when no rank completed one) and its metrics: carried
    (answers left unfinished), dropped answers and tokens (too stale), the staleness of the trained
    tokens (mean, max) and the share of the token budget decoded. draw_prompts(k): the stream's next
    k prompts of this rank. Advances state.in_flight."""
    it, n = state.step, r.samples_per_prompt
    groups = state.in_flight
    dropped, dropped_tokens = drop_stale(groups, it, r.max_staleness)
    wanted = distributed.max_over_ranks(max(r.prompts_per_iteration - len(groups), 0))
    fresh = draw_prompts(wanted) if wanted else []
    groups += [new_group(p, n, seed * 7919 + g) for g, p in enumerate(fresh)]
    rows = [(group, sample) for group in groups for sample in group["samples"] if sample["finish"] is None]
    budget = token_budget(r)
    params = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                            max_new_tokens=r.max_new_tokens, ignore_eos=r.ignore_eos)
    decoded = 0
    if rows:
        with timer.phase("generate"):
            outs = models.actor.continue_answers([g["prompt"] for g, _ in rows], [s["answer"] for _, s in rows],
                                                 [s["seed"] for _, s in rows], params, budget)
        for (_, sample), out in zip(rows, outs):
            sample["answer"] += out.token_ids
            sample["logprobs"] += out.logprobs
            sample["versions"] += [it] * len(out.token_ids)
            sample["finish"] = out.finish_reason
            decoded += len(out.token_ids)
    done = [g for g in groups if all(s["finish"] is not None for s in g["samples"])]
    trained = done[:distributed.min_over_ranks(len(done))]
    state.in_flight = [g for g in groups if not any(g is t for t in trained)]
    staleness = [it - v for g in trained for s in g["samples"] for v in s["versions"]]
    metrics = distributed.all_reduce_sum({
        "carried": sum(s["finish"] is None for g in state.in_flight for s in g["samples"]),
        "dropped_answers": dropped, "dropped_tokens": dropped_tokens, "groups_trained": len(trained),
        "staleness_sum": sum(staleness), "trained_tokens": len(staleness), "decoded": decoded})
    metrics.update(staleness_max=distributed.max_over_ranks(max(staleness, default=0)),
                   staleness_mean=metrics.pop("staleness_sum") / max(metrics.pop("trained_tokens"), 1),
                   budget_used=metrics.pop("decoded") / (budget * distributed.data_world_size()))
    if not trained:
        return None, metrics
    samples = [(g["prompt"], s) for g in trained for s in g["samples"]]
    logprobs = torch.tensor([x for _, s in samples for x in s["logprobs"]], dtype=torch.float32,
                            device=models.actor.llm.device)
    return score_samples(models, [p for p, _ in samples], [s["answer"] for _, s in samples], logprobs, r,
                         timer), metrics
