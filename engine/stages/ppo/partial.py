"""Partial rollouts (rollout.partial_rollouts; Kimi k1.5's, verl's partial_rollout): a scheduler
policy of the one rollout interface (sampler.py) that stops once it has prompts_per_iteration
complete groups, instead of waiting for its longest answer; what it hands on is packed and scored
as every mode's rows (sampled_rows.py).

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
from its own seed's stream at its own positions (one engine run of requests with their answers so
far: inference/request.py). Multi-turn trajectories (rollout.tools, rollout.environment) carry the
same way, their environments alive beside the loop state (engine/agents/carried.py): not in a
checkpoint, so a resumed run restarts the trajectories it had in flight (counted).
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from ...parallel import distributed
from ...config.ppo import RolloutConfig
from ...data.prompts import PromptRow
from ...agents import CarriedTrajectories, agent_metrics
from ...inference.request import Request
from ...inference.sampling_params import SamplingParams
from ...inference.stop_rules import GroupsDone, TokenBudget, first_of
from .models import PPOModels
from .phase_timer import PhaseTimer
from .sampled_rows import Generated, sampled_routing, sampling_params
from .scored_rows import Samples
from .state import PPOState


def new_group(prompt: list[int], n: int, seed: int, source: PromptRow | None = None,
              multi_turn: bool = False) -> dict:
    """A group in flight: its prompt's token ids (and its data row, `source`, for the scorer) and
    n empty samples, each with its own sampling seed (multi_turn: trajectories, with their model
    mask and turns: engine/agents/carried.py)."""
    rng = random.Random(seed)
    row = None if source is None else {"prompt": source.prompt, "columns": source.columns}
    samples = [{"seed": rng.getrandbits(63)} for _ in range(n)]
    for sample in samples:
        restart(sample, multi_turn)
    return {"prompt": list(prompt), "source": row, "samples": samples}


def restart(sample: dict, multi_turn: bool | None = None) -> None:
    """`sample` back to no token (its seed kept: it draws the same stream again); multi_turn: a
    trajectory's fields too (None: as it has them)."""
    sample.update(answer=[], logprobs=[], versions=[], finish=None)
    if multi_turn or (multi_turn is None and "mask" in sample):
        sample.update(mask=[], turn_start=0, turns=0)


def drop_stale(groups: list[dict], iteration: int, max_staleness: int) -> tuple[int, int]:
    """Reset every sample whose oldest token would be more than max_staleness iterations old if it
    trained at `iteration` (it is sampled again from its prompt, same seed). Returns (answers,
    tokens) dropped."""
    answers = tokens = 0
    for group in groups:
        for sample in group["samples"]:
            if sample["versions"] and iteration - min(sample["versions"]) > max_staleness:
                answers, tokens = answers + 1, tokens + len(sample["answer"])
                restart(sample)
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


def generate_in_flight(models: PPOModels, groups: list[dict], rollout: RolloutConfig,
                       iteration: int, timer: PhaseTimer, advance,
                       records: dict | None = None) -> int:
    """Continue every unfinished sample until rollout.prompts_per_iteration groups are complete or
    the token budget is drawn (one engine run: advance(rows, stop), rows (group, sample), continues
    and updates them: single-turn answers, `advance_answers`, or carried trajectories),
    recording each new model token's version, and in `records` (routing replay: id(sample) ->
    (sample, its records [prompt + answer, sparse layers, k])) the records of the forwards that
    continued it. Returns the tokens drawn."""
    index = unfinished(groups)
    needed = rollout.prompts_per_iteration - sum(map(complete, groups))
    if not index or needed <= 0:
        return 0
    rows = [(groups[g], sample) for g, sample in index]
    before = [len(sample["logprobs"]) for _, sample in rows]
    budget = rollout.tokens_per_iteration
    stop = first_of(None if budget is None else TokenBudget(budget),
                    GroupsDone([g for g, _ in index], needed))
    with timer.phase("generate"):
        seqs = advance(rows, stop)
        cp = models.policy.context_parallel
        if cp is not None:  # a context group carries its first rank's samples (sampled_rows.py)
            for group, first in zip(groups, cp.same_on_ranks(groups)):
                group["prompt"] = first["prompt"]
                for sample, kept in zip(group["samples"], first["samples"]):
                    sample.update(kept)
    drawn = 0
    for (_, sample), had in zip(rows, before):
        sample["versions"] += [iteration] * (len(sample["logprobs"]) - had)
        drawn += len(sample["logprobs"]) - had
    routing = sampled_routing(models)
    if records is not None and routing is not None:  # row after row: each whole sequence
        for (_, sample), part in zip(rows, routing.split([seq.num_tokens for seq in seqs])):
            records[id(sample)] = (sample, part)
    return drawn


def advance_answers(models: PPOModels, params: SamplingParams):
    """generate_in_flight's `advance` of single-turn answers: each continued from where it
    stands (prompt + answer prefilled again under the current weights), drawing from its own
    seed's stream at its own positions, params.max_new_tokens counting its earlier tokens."""
    def advance(rows: list[tuple[dict, dict]], stop) -> list:
        seqs = models.actor.run([Request(group["prompt"], params, answer=sample["answer"],
                                         seed=sample["seed"]) for group, sample in rows], stop)
        for (group, sample), seq in zip(rows, seqs):
            sample.update(answer=seq.token_ids[len(group["prompt"]):],
                          logprobs=sample["logprobs"] + list(seq.logprobs),
                          finish=seq.finish_reason)
        return seqs
    return advance


class PartialRollouts:
    """The scheduler policy of rollout.partial_rollouts: groups carried across iterations, an
    iteration handing on the ones complete (sampler.py): single-turn answers, or with `carried`
    (engine/agents/carried.py) multi-turn trajectories whose environments stay alive while they
    are in flight. draw_prompts(state, k): the stream's next k prompts of this rank; score:
    everything after sampling (sampled_rows.Scoring)."""

    def __init__(self, models: PPOModels, draw_prompts: Callable[[PPOState, int], list[PromptRow]],
                 score: Callable[[Generated, PhaseTimer], Samples], rollout: RolloutConfig,
                 carried: CarriedTrajectories | None = None):
        self.models, self.draw_prompts, self.score = models, draw_prompts, score
        self.rollout, self.carried = rollout, carried
        self.advance = (advance_answers(models, sampling_params(rollout)) if carried is None
                        else carried.advance)
        # Routing replay: each sample's records, from the forwards that last continued it (its
        # carried tokens prefilled again then); held beside the loop state, not in checkpoints:
        # a resumed run's samples train without records until a forward continues them.
        self.records: dict = {}

    def sample(self, state: PPOState, seed: int, timer: PhaseTimer) -> tuple[Samples | None, dict]:
        """This iteration's complete groups, scored (None when no rank completed one), and its
        metrics: carried (partial answers left unfinished), dropped answers and tokens (too stale),
        the staleness of the trained tokens (mean, max), the tokens drawn and the share of the
        token budget; with trajectories the agents' metrics of the trained ones
        (engine/agents agent_metrics) and restarted (trajectories begun again: an environment
        this process no longer has, after a resume). Advances state.in_flight."""
        models, rollout = self.models, self.rollout
        it, groups, ranks = state.step, state.in_flight, models.ranks
        dropped, dropped_tokens = drop_stale(groups, it, rollout.max_staleness)
        wanted = distributed.max_over_ranks(
            new_groups_wanted(len(groups), rollout.prompts_per_iteration), ranks)
        fresh = self.draw_prompts(state, wanted) if wanted else []
        groups += [new_group(p.ids, rollout.samples_per_prompt, seed * 7919 + g, p,
                             self.carried is not None) for g, p in enumerate(fresh)]
        restarted = 0 if self.carried is None else self.open_environments(groups)
        drawn = generate_in_flight(models, groups, rollout, it, timer, self.advance,
                                   self.records)
        done = [g for g in groups if complete(g)][:rollout.prompts_per_iteration]
        trained = done[:distributed.min_over_ranks(len(done), ranks)]
        state.in_flight = [g for g in groups if not any(g is t for t in trained)]
        staleness = [it - v for g in trained for s in g["samples"] for v in s["versions"]]
        counts = {"carried": sum(bool(s["answer"]) for _, s in unfinished(state.in_flight)),
                  "dropped_answers": dropped, "dropped_tokens": dropped_tokens,
                  "groups_trained": len(trained), "staleness_sum": sum(staleness),
                  "trained_tokens": len(staleness), "drawn_tokens": drawn}
        if self.carried is not None:
            counts["restarted"] = restarted
        metrics = distributed.all_reduce_sum(counts, ranks)
        total = metrics.pop("staleness_sum")
        metrics.update(staleness_max=distributed.max_over_ranks(max(staleness, default=0), ranks),
                       staleness_mean=total / max(metrics.pop("trained_tokens"), 1))
        if rollout.tokens_per_iteration is not None:
            budget = rollout.tokens_per_iteration * ranks.size()
            metrics["budget_used"] = metrics["drawn_tokens"] / budget
        records = [self.records.pop(id(s), (None, None))[1]
                   for g in trained for s in g["samples"]]
        live = {id(s) for g in state.in_flight for s in g["samples"]}
        self.records = {k: v for k, v in self.records.items() if k in live}
        if not trained:
            return None, metrics
        trajectories = None
        if self.carried is not None:
            trajectories = self.carried.trajectories(
                [(g, s) for g in trained for s in g["samples"]])
            metrics.update(agent_metrics(trajectories))
        return self.score(completed(trained, rollout.samples_per_prompt, models.actor.device,
                                    records, trajectories), timer), metrics

    def open_environments(self, groups: list[dict]) -> int:
        """An environment for every trajectory about to start: new, dropped as stale, or one
        whose environment this process does not have (a resumed run's: it starts again, its
        tokens dropped). Returns how many had tokens (restarted)."""
        restarted, starts = 0, []
        for group in groups:
            starting = [s for s in group["samples"]
                        if not s["answer"] or self.carried.needs_restart(s)]
            restarted += sum(bool(s["answer"]) for s in starting)
            for sample in starting:
                restart(sample)
            if starting:
                source = group["source"] or {"prompt": "", "columns": {}}
                starts.append((group, {"prompt": source["prompt"], **source["columns"]},
                               starting))
        if starts:
            self.carried.open(starts)
        return restarted

    def close(self) -> None:
        """The trajectories' environments closed (the run is over)."""
        if self.carried is not None:
            self.carried.close()


def completed(trained: list[dict], n: int, device, records: list | None = None,
              trajectories: list | None = None) -> Generated:
    """The rows of complete groups in flight, each sample's log-probs as its tokens drew them;
    records: each row's routing records (generate_in_flight; None where a row has none: -1, it
    routes freely; cut or padded to the row: a reply kept after a stopped run was not forwarded),
    all None or absent without routing replay; trajectories: each row's engine/agents
    AgentTrajectory (multi-turn: its model mask, environment rewards, conversation; one that
    left the batch on an environment's error has no target)."""
    rows = [(g["prompt"], s) for g in trained for s in g["samples"]]
    left = [t is not None and t.error is not None for t in trajectories or [None] * len(rows)]
    logprobs = torch.tensor([x for (_, s), out in zip(rows, left) if not out
                             for x in s["logprobs"]], dtype=torch.float32, device=device)
    sources = [PromptRow(g["prompt"], g["source"]["prompt"], g["source"]["columns"])
               for g in trained] if all(g["source"] for g in trained) else None
    known = next((x for x in records or () if x is not None), None)
    routing = None
    if known is not None:
        parts = []
        for x, (p, s) in zip(records, rows):
            length = len(p) + len(s["answer"])
            part = known.new_full((length, *known.shape[1:]), -1)
            if x is not None:
                part[:min(length, len(x))] = x[:length]
            parts.append(part)
        routing = torch.cat(parts)
    masks = env_rewards = None
    if trajectories is not None:
        masks = [[False] * len(s["mask"]) if t.error else s["mask"]
                 for (_, s), t in zip(rows, trajectories)]
        env_rewards = [[] if t.error else list(t.turn_rewards) for t in trajectories]
    return Generated([p for p, _ in rows], [s["answer"] for _, s in rows], logprobs, n, sources,
                     masks, env_rewards, trajectories, routing)
