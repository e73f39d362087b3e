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

With rollout.dynamic_sampling an iteration trains only the complete groups whose scores differ
(dynamic_sampling.keep_varied; the others are dropped, their prompts spent), the groups in flight
topping the next iteration up instead of further sampling rounds.

The groups in flight are typed (engine/inference/in_flight.py `Group`s of `Sample`s), their
state_dicts the loop state's (`PPOState.in_flight`, saved in every checkpoint), so a resumed run
continues exactly as the uninterrupted one: each sample draws from its own seed's stream at its own
positions (one engine run of requests with their answers so far: inference/request.py).
Multi-turn trajectories (rollout.tools, rollout.environment) carry the same way, their
environments alive on the samples (engine/agents/carried.py): not in a checkpoint, so a resumed
run restarts the trajectories it had in flight (counted).

A prompt with images carries them as it carries its tokens: the group's source row holds them, each
continuation sends them again with the answer so far (the engine runs the tower on them once, and
places the answer's tokens past the prompt's M-RoPE positions at their decode offset, as a plain
decode would), and the group trains on its row's images. A checkpoint names the row (its index in
the run's prompts and its images' sha256: in_flight.py), never its pixels; a resumed run reads the
row back from the data.
"""
from __future__ import annotations

from typing import Callable

from ...parallel import distributed
from ...config.ppo import RolloutConfig
from ...data.prompts import PromptRow
from ...agents import CarriedTrajectories, agent_metrics
from ...inference.in_flight import Group, unfinished
from ...inference.stop_rules import GroupsDone, TokenBudget, first_of
from .answer_rows import advance_answers
from .dynamic_sampling import keep_varied
from .models import PPOModels
from .phase_timer import PhaseTimer
from .rows import Advance, advance_rows, generated_of
from .sampled_rows import Generated, sampling_params
from .scored_rows import Samples
from .state import PPOState


def drop_stale(groups: list[Group], iteration: int, max_staleness: int) -> tuple[int, int]:
    """Reset every sample whose oldest token would be more than max_staleness iterations old if it
    trained at `iteration` (it is sampled again from its prompt, same seed). Returns (answers,
    tokens) dropped."""
    answers = tokens = 0
    for group in groups:
        for sample in group.samples:
            if sample.versions and iteration - min(sample.versions) > max_staleness:
                answers, tokens = answers + 1, tokens + len(sample.tokens)
                sample.restart()
    return answers, tokens


def new_groups_wanted(in_flight: int, per_iteration: int) -> int:
    """New groups an iteration adds: as many as bring those in flight to twice per_iteration (the
    iteration ends at per_iteration complete: the other half carries the long answers)."""
    return max(0, 2 * per_iteration - in_flight)


def generate_in_flight(models: PPOModels, groups: list[Group], rollout: RolloutConfig,
                       iteration: int, timer: PhaseTimer, advance: Advance) -> int:
    """Continue every unfinished sample until rollout.prompts_per_iteration groups are complete or
    the token budget is drawn (one engine run: rows.advance_rows over the row kind's `advance`,
    single-turn answers or carried trajectories), each new model token recorded with its
    version, each row with the routing records of the forwards that continued it. Returns the
    tokens drawn."""
    rows = unfinished(groups)
    needed = rollout.prompts_per_iteration - sum(g.complete for g in groups)
    if not rows or needed <= 0:
        return 0
    index = {id(g): i for i, g in enumerate(groups)}
    budget = rollout.tokens_per_iteration
    stop = first_of(None if budget is None else TokenBudget(budget),
                    GroupsDone([index[id(g)] for g, _ in rows], needed))
    with timer.phase("generate"):
        return advance_rows(models, rows, advance, stop, iteration, carried=groups)


class PartialRollouts:
    """The scheduler policy of rollout.partial_rollouts: groups carried across iterations, an
    iteration handing on the ones complete (sampler.py): single-turn answers, or with `carried`
    (engine/agents/carried.py) multi-turn trajectories whose environments stay alive while they
    are in flight. draw_prompts(state, k): the stream's next k prompts of this rank; score:
    everything after sampling (sampled_rows.Scoring); rows: the run's prompts, from which a
    resumed run reads back the rows with images its checkpoint names (in_flight.Group.load)."""

    def __init__(self, models: PPOModels, draw_prompts: Callable[[PPOState, int], list[PromptRow]],
                 score: Callable[[Generated, PhaseTimer], Samples], rollout: RolloutConfig,
                 carried: CarriedTrajectories | None = None, rows: list[PromptRow] | None = None):
        self.models, self.draw_prompts, self.score = models, draw_prompts, score
        self.rollout, self.carried, self.rows = rollout, carried, rows
        self.advance = (advance_answers(models, sampling_params(rollout)) if carried is None
                        else carried.advance)
        # The typed groups in flight and the loop state's copy of them this schedule last wrote
        # (a resumed run's loop state is another: its groups are loaded from it).
        self.groups: list[Group] = []
        self.saved: list | None = None

    def in_flight(self, state: PPOState) -> list[Group]:
        """The groups in flight: this schedule's, or those a resumed run's loop state holds."""
        if state.in_flight is not self.saved:
            self.groups = [Group.load(g, self.rows) for g in state.in_flight]
        return self.groups

    def keep(self, state: PPOState, groups: list[Group]) -> None:
        """`groups` in flight, their state_dicts in the loop state."""
        self.groups = groups
        state.in_flight = self.saved = [g.state_dict() for g in groups]

    def sample(self, state: PPOState, seed: int, timer: PhaseTimer) -> tuple[Samples | None, dict]:
        """This iteration's complete groups, scored (None when no rank completed one), and its
        metrics: carried (partial answers left unfinished), dropped answers and tokens (too stale),
        the staleness of the trained tokens (mean, max), the tokens drawn and the share of the
        token budget; with trajectories the agents' metrics of the trained ones
        (engine/agents agent_metrics) and restarted (trajectories begun again: an environment
        this process no longer has, after a resume). Advances state.in_flight."""
        models, rollout = self.models, self.rollout
        it, groups, ranks = state.step, self.in_flight(state), models.ranks
        dropped, dropped_tokens = drop_stale(groups, it, rollout.max_staleness)
        wanted = distributed.max_over_ranks(
            new_groups_wanted(len(groups), rollout.prompts_per_iteration), ranks)
        fresh = self.draw_prompts(state, wanted) if wanted else []
        groups += [Group.new(p.ids, rollout.samples_per_prompt, seed * 7919 + g, p,
                             self.carried is not None) for g, p in enumerate(fresh)]
        restarted = 0 if self.carried is None else self.open_environments(groups)
        drawn = generate_in_flight(models, groups, rollout, it, timer, self.advance)
        done = [g for g in groups if g.complete][:rollout.prompts_per_iteration]
        trained = done[:distributed.min_over_ranks(len(done), ranks)]
        self.keep(state, [g for g in groups if not any(g is t for t in trained)])
        staleness = [it - v for g in trained for s in g.samples for v in s.versions]
        counts = {"carried": sum(bool(s.tokens) for _, s in unfinished(self.groups)),
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
        if not trained:
            return None, metrics
        trajectories = None
        if self.carried is not None:
            trajectories = self.carried.trajectories(
                [(g, s) for g in trained for s in g.samples])
            metrics.update(agent_metrics(trajectories))
        samples = self.score(generated_of(trained, rollout.samples_per_prompt,
                                          models.actor.device, trajectories), timer)
        if rollout.dynamic_sampling:  # the varied groups of those complete
            samples, counts = keep_varied(samples, ranks)
            metrics.update(counts)
            if not samples.groups:
                return None, metrics
        return samples, metrics

    def open_environments(self, groups: list[Group]) -> int:
        """An environment for every trajectory about to start: new, dropped as stale, or one
        whose environment this process does not have (a resumed run's: it starts again, its
        tokens dropped). Returns how many had tokens (restarted)."""
        restarted, starts = 0, []
        for group in groups:
            starting = [s for s in group.samples
                        if not s.tokens or self.carried.needs_restart(s)]
            restarted += sum(bool(s.tokens) for s in starting)
            for sample in starting:
                sample.restart()
            if starting:
                source = group.source or PromptRow([], "", {})
                starts.append((group, {"prompt": source.prompt, **source.columns}, starting))
        if starts:
            self.carried.open(starts)
        return restarted

    def close(self) -> None:
        """The trajectories' environments closed (the run is over)."""
        if self.carried is not None:
            self.carried.close()
