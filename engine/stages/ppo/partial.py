"""Partial rollouts (rollout.partial_rollouts; Kimi k1.5's, verl's partial_rollout): a scheduler
policy of the one rollout interface (sampler.py) that stops once it has prompts_per_iteration
complete groups, instead of waiting for its longest answer; what it hands on is packed and scored
as every mode's rows (generated.py).

Each iteration tops the groups in flight on a rank up to twice prompts_per_iteration with new
prompts and decodes their unfinished answers, the carried ones first (prefilled again under the
current weights), all of them in one batch of up to 2 x prompts_per_iteration x samples_per_prompt
rows (RolloutConfig.max_rows), until prompts_per_iteration groups are complete or
rollout.tokens_per_iteration tokens are drawn: the first to complete are those without a long
answer, and the long answers carry on in the next iteration instead of holding the batch. The
unfinished keep their tokens, the sampler's log-prob of each and the iteration (policy version)
that drew it, and free their KV. A group trains once all its samples are done (at most
prompts_per_iteration, the oldest first; ranks train as many as the rank with fewest, the rest
wait); the IS correction (ppo.is_mode, tis by default here) weights each token by its own sampler
log-prob. Before each iteration an answer (finished or not) whose oldest token would train more than
rollout.max_staleness iterations after it was drawn is dropped and sampled again (counted), so no
trained token is older.

The groups in flight are plain lists and numbers in the loop state (`PPOState.in_flight`, saved in
every checkpoint), so a resumed run continues exactly as the uninterrupted one: each sample draws
from its own seed's stream at its own positions (LLM.continue_answers).
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from ...parallel import distributed
from ...config.ppo import RolloutConfig
from ...data.prompts import PromptRow
from .models import PPOModels
from .phase_timer import PhaseTimer
from .generated import Generated, sampled_routing, sampling_params
from .samples import Samples
from .state import PPOState


def new_group(prompt: list[int], n: int, seed: int, source: PromptRow | None = None) -> dict:
    """A group in flight: its prompt's token ids (and its data row, `source`, for the scorer) and
    n empty samples, each with its own sampling seed."""
    rng = random.Random(seed)
    row = None if source is None else {"prompt": source.prompt, "columns": source.columns}
    return {"prompt": list(prompt), "source": row, "samples": [
        {"answer": [], "logprobs": [], "versions": [], "finish": None, "seed": rng.getrandbits(63)}
        for _ in range(n)]}


def drop_stale(groups: list[dict], iteration: int, max_staleness: int) -> tuple[int, int]:
    """Reset every sample whose oldest token would be more than max_staleness iterations old if it
    trained at `iteration` (it is sampled again from its prompt, same seed). Returns (answers,
    tokens) dropped."""
    answers = tokens = 0
    for group in groups:
        for sample in group["samples"]:
            if sample["versions"] and iteration - min(sample["versions"]) > max_staleness:
                answers, tokens = answers + 1, tokens + len(sample["answer"])
                sample.update(answer=[], logprobs=[], versions=[], finish=None)
    return answers, tokens


def new_groups_wanted(in_flight: int, per_iteration: int) -> int:
    """New groups an iteration adds: as many as bring those in flight to twice per_iteration (the
    iteration ends at per_iteration complete: the other half carries the long answers)."""
    return max(0, 2 * per_iteration - in_flight)


def unfinished(groups: list[dict]) -> list[tuple[int, dict]]:
    """(group index, sample) of every sample still to generate, oldest group first."""
    return [(g, s) for g, group in enumerate(groups) for s in group["samples"]
            if s["finish"] is None]


def complete(group: dict) -> bool:
    return all(s["finish"] is not None for s in group["samples"])


def generate_in_flight(models: PPOModels, groups: list[dict], r: RolloutConfig, iteration: int,
                       timer: PhaseTimer, records: dict | None = None) -> int:
    """Continue every unfinished answer until r.prompts_per_iteration groups are complete or the
    token budget is drawn, recording each new token's log-prob and version, and in `records`
    (routing replay: id(sample) -> (sample, its routing records [prompt + answer, sparse layers,
    k])) the records of the forwards that continued it. Returns the tokens drawn."""
    rows = unfinished(groups)
    needed = r.prompts_per_iteration - sum(map(complete, groups))
    if not rows or needed <= 0:
        return 0
    with timer.phase("generate"):
        outs = models.actor.continue_answers(
            [groups[g]["prompt"] for g, _ in rows], [s["answer"] for _, s in rows],
            [s["seed"] for _, s in rows], sampling_params(r), r.tokens_per_iteration,
            [g for g, _ in rows], needed)
        cp = models.policy.context_parallel
        if cp is not None:  # a context group carries its first rank's answers (generated.py)
            outs = cp.same_on_ranks(outs)
    for (_, sample), out in zip(rows, outs):
        sample["answer"] += out.token_ids
        sample["logprobs"] += out.logprobs
        sample["versions"] += [iteration] * len(out.token_ids)
        sample["finish"] = out.finish_reason
    routing = sampled_routing(models)
    if records is not None and routing is not None:  # row after row: prompt + whole answer
        lengths = [len(groups[g]["prompt"]) + len(sample["answer"]) for g, sample in rows]
        for (_, sample), part in zip(rows, routing.split(lengths)):
            records[id(sample)] = (sample, part)
    return sum(len(out.token_ids) for out in outs)


class PartialRollouts:
    """The scheduler policy of rollout.partial_rollouts: groups carried across iterations, an
    iteration handing on the ones complete (sampler.py; single-turn answers: a multi-turn
    trajectory's environment does not carry). draw_prompts(state, k): the stream's next k prompts
    of this rank; score: everything after sampling (generated.Scoring)."""

    def __init__(self, models: PPOModels, draw_prompts: Callable[[PPOState, int], list[PromptRow]],
                 score: Callable[[Generated, PhaseTimer], Samples], r: RolloutConfig):
        self.models, self.draw_prompts, self.score, self.r = models, draw_prompts, score, r
        # Routing replay: each sample's records, from the forwards that last continued it (its
        # carried tokens prefilled again then); held beside the loop state, not in checkpoints:
        # a resumed run's samples train without records until a forward continues them.
        self.records: dict = {}

    def sample(self, state: PPOState, seed: int, timer: PhaseTimer) -> tuple[Samples | None, dict]:
        """This iteration's complete groups, scored (None when no rank completed one), and its
        metrics: carried (partial answers left unfinished), dropped answers and tokens (too stale),
        the staleness of the trained tokens (mean, max), the tokens drawn and the share of the
        token budget. Advances state.in_flight."""
        models, r = self.models, self.r
        it, groups, ranks = state.step, state.in_flight, models.ranks
        dropped, dropped_tokens = drop_stale(groups, it, r.max_staleness)
        wanted = distributed.max_over_ranks(
            new_groups_wanted(len(groups), r.prompts_per_iteration), ranks)
        fresh = self.draw_prompts(state, wanted) if wanted else []
        groups += [new_group(p.ids, r.samples_per_prompt, seed * 7919 + g, p)
                   for g, p in enumerate(fresh)]
        drawn = generate_in_flight(models, groups, r, it, timer, self.records)
        done = [g for g in groups if complete(g)][:r.prompts_per_iteration]
        trained = done[:distributed.min_over_ranks(len(done), ranks)]
        state.in_flight = [g for g in groups if not any(g is t for t in trained)]
        staleness = [it - v for g in trained for s in g["samples"] for v in s["versions"]]
        metrics = distributed.all_reduce_sum({
            "carried": sum(bool(s["answer"]) for _, s in unfinished(state.in_flight)),
            "dropped_answers": dropped, "dropped_tokens": dropped_tokens,
            "groups_trained": len(trained), "staleness_sum": sum(staleness),
            "trained_tokens": len(staleness), "drawn_tokens": drawn}, ranks)
        total = metrics.pop("staleness_sum")
        metrics.update(staleness_max=distributed.max_over_ranks(max(staleness, default=0), ranks),
                       staleness_mean=total / max(metrics.pop("trained_tokens"), 1))
        if r.tokens_per_iteration is not None:
            budget = r.tokens_per_iteration * ranks.size()
            metrics["budget_used"] = metrics["drawn_tokens"] / budget
        records = [self.records.pop(id(s), (None, None))[1]
                   for g in trained for s in g["samples"]]
        live = {id(s) for g in state.in_flight for s in g["samples"]}
        self.records = {k: v for k, v in self.records.items() if k in live}
        if not trained:
            return None, metrics
        return self.score(completed(trained, r.samples_per_prompt, models.actor.llm.device,
                                    records), timer), metrics


def completed(trained: list[dict], n: int, device, records: list | None = None) -> Generated:
    """The rows of complete groups in flight, each sample's log-probs as its tokens drew them;
    records: each row's routing records (generate_in_flight; None where a row has none: -1, it
    routes freely), all None or absent without routing replay."""
    rows = [(g["prompt"], s) for g in trained for s in g["samples"]]
    logprobs = torch.tensor([x for _, s in rows for x in s["logprobs"]], dtype=torch.float32,
                            device=device)
    sources = [PromptRow(g["prompt"], g["source"]["prompt"], g["source"]["columns"])
               for g in trained] if all(g["source"] for g in trained) else None
    known = next((x for x in records or () if x is not None), None)
    routing = None if known is None else torch.cat([
        x if x is not None else known.new_full((len(p) + len(s["answer"]), *known.shape[1:]), -1)
        for x, (p, s) in zip(records, rows)])
    return Generated([p for p, _ in rows], [s["answer"] for _, s in rows], logprobs, n, sources,
                     routing=routing)
