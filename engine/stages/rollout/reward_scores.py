"""The reward of a rollout's rows: a reward model at each sequence's last token (reading the
rollout's one pack), or the user's reward functions of the decoded rows (reward_inputs builds what
they are called with)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch

from ...data.loading import report
from ...data.packing import PackedBatch, pack_sequences
from ...data.prompts import column_lists
from ...parallel import distributed
from ..rewards.combined import RewardFunctions, moments, summary, weighted_totals
from ..rewards.functions import RewardFunctionError, RewardInputs
from .microbatches import forward_in_microbatches

FLOAT32_MAX = torch.finfo(torch.float32).max

# (prompts, responses) token ids and their prompt rows (reward_inputs) -> scores [R]; metrics()
# -> the scores' metrics since its last call. A scorer that can read the rollout's pack instead (a
# reward model) also has `score_packed(packed) -> [R]`.
Scorer = Callable[[list[list[int]], list[list[int]], Optional[list]], torch.Tensor]


class RewardModelScorer:
    """Scores from a reward model (its normalization offset applied) at each sequence's last token.
    critic_lora: the LoRA critic's adapters when they hook the reward model's own projections (the
    critic shares its trunk): switched off while it scores."""

    def __init__(self, rm, critic_lora=None):
        self.rm, self.critic_lora = rm, critic_lora

    def score_packed(self, packed: PackedBatch) -> torch.Tensor:
        """Scores [S] of an already packed batch (the rollout's own pack: no second packing)."""
        off = (self.critic_lora.disabled() if self.critic_lora is not None
               else contextlib.nullcontext())
        with off:
            return self.rm.packed_rewards(packed)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]],
                 rows=None) -> torch.Tensor:
        packed = pack_sequences([(p, r, False) for p, r in zip(prompts, responses)],
                                device=next(self.rm.parameters()).device)
        return self.score_packed(packed)

    def metrics(self) -> dict:
        return {}  # its scores are the rollout's score_mean and score_std


def reward_model_scorer(rm, critic_lora=None) -> RewardModelScorer:
    return RewardModelScorer(rm, critic_lora)


def score_rows(score: Scorer, prompts: list[list[int]], responses: list[list[int]],
               packed: PackedBatch, tokens_per_forward: int | None = None,
               rows: Optional[list] = None,
               ranks: distributed.DataRanks = distributed.WORLD,
               trajectories: Optional[list] = None) -> torch.Tensor:
    """Scores [R] of the rollout's rows, from its pack when the scorer reads one (in micro-batches
    of at most `tokens_per_forward` tokens over the data `ranks`: microbatches.py); `rows`: their
    prompt rows (reward_inputs). trajectories: [R] the multi-turn rows' engine/agents
    AgentTrajectory, whose role-tagged messages the reward functions read (trajectory_inputs); one
    that left the batch is not scored (NaN: it has no trained token, so nothing reads it)."""
    score_packed = getattr(score, "score_packed", None)
    if score_packed is not None:
        return forward_in_microbatches(packed, tokens_per_forward, score_packed, ranks)
    if trajectories is None:
        return score(prompts, responses, rows)
    scores = torch.full((len(trajectories),), float("nan"))
    stayed = [i for i, t in enumerate(trajectories) if not t.error]
    if stayed:  # the same rows on every rank of a group, so its ranks call it alike
        scores[stayed] = score.score_inputs(lambda: trajectory_inputs(
            [trajectories[i] for i in stayed], [rows[i] for i in stayed]))
    return scores


def trajectory_inputs(trajectories: list, rows: list) -> RewardInputs:
    """What the reward functions are called with for multi-turn trajectories: the model's own
    turns as the completion (their texts, a blank line apart, and their sampled ids), and as TRL's
    keyword `completions` the messages after the opening with their roles as the environment and
    tools sent them: a tool's output is a `tool` message however it is worded, never a turn of the
    user's. prompt_texts: the opening messages' contents, one a line."""
    turns = [[m["content"] for m in t.messages[t.opening:] if m["role"] == "assistant"]
             for t in trajectories]
    ids = [[i for i, own in zip(t.tokens.token_ids, t.tokens.model_mask) if own]
           for t in trajectories]
    return RewardInputs([row.prompt for row in rows],
                        ["\n".join(m["content"] for m in t.messages[:t.opening])
                         for t in trajectories],
                        ["\n\n".join(said) for said in turns], ids, column_lists(rows),
                        completion_messages=[[dict(m) for m in t.messages[t.opening:]]
                                             for t in trajectories])


def reward_inputs(tokenizer, prompts: list[list[int]], responses: list[list[int]],
                  rows: Optional[list] = None) -> RewardInputs:
    """What the reward functions are called with for R rows, built here alone. prompts, responses:
    [R] token ids; rows: [R] each row's prompt row, with `.prompt` (a string or a message list, as
    the data holds it) and `.columns` (its other columns, {name: value}); None where the prompts
    are token ids alone: their decoded text then stands in, and there are no columns."""
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    completion_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    completion_ids = [list(map(int, r)) for r in responses]
    if rows is None:
        return RewardInputs(prompt_texts, prompt_texts, completion_texts, completion_ids)
    return RewardInputs([row.prompt for row in rows], prompt_texts, completion_texts,
                        completion_ids, column_lists(rows))


class FunctionScorer:
    """Scores from the reward functions (engine/stages/rewards/): each row's weighted sum over the
    functions that apply to it. groups: the groups of ranks holding the same rows (the policy's
    TensorParallel, then its ContextParallel, each with `rank` and `same_on_ranks`): only the
    first rank of all of them calls the functions, and every rank takes their scores (handed on
    group by group), so the ranks agree even with a reward function that is not deterministic; the
    metrics are summed over the data `ranks`."""

    def __init__(self, functions: RewardFunctions, tokenizer, groups: tuple = (),
                 ranks: distributed.DataRanks = distributed.WORLD):
        self.functions, self.tokenizer = functions, tokenizer
        self.groups, self.ranks = groups, ranks
        self.sums: dict = {}  # moments of every row scored since the last metrics()
        self.unscored_said = self.non_finite_said = False

    def __call__(self, prompts: list[list[int]], responses: list[list[int]],
                 rows: Optional[list] = None) -> torch.Tensor:
        """Scores [R] fp32 of the rows: their prompt and response ids and dataset rows
        (reward_inputs)."""
        return self.score_inputs(lambda: reward_inputs(self.tokenizer, prompts, responses, rows))

    def score_inputs(self, make_inputs: Callable[[], RewardInputs]) -> torch.Tensor:
        """Scores [R] fp32 of the rows make_inputs() gives (called on the first rank alone)."""
        scores = None
        if all(group.rank == 0 for group in self.groups):
            scores = self.functions(make_inputs())
        for group in self.groups:  # from each group's first rank, which holds them by then
            scores = group.same_on_ranks(scores)
        for runner, values in zip(self.functions.runners, scores):
            float32_scores(values, runner.name)
            bad = next((v for v in values if v is not None and not math.isfinite(v)), None)
            if bad is not None and not self.non_finite_said and distributed.is_main():
                self.non_finite_said = True
                report(f"the reward function {runner.name} returned {bad} for a response: its "
                       "row is dropped (with a group estimator, its group), counted in "
                       "dropped_rows (said once)")
        totals, unscored = weighted_totals(scores, self.functions.weights)
        for key, value in moments(self.functions.names, scores, totals).items():
            self.sums[key] = self.sums.get(key, 0) + value
        if unscored and not self.unscored_said and distributed.is_main():
            self.unscored_said = True
            report(f"{unscored} of {len(totals)} responses had no reward function that applies "
                   "(each returned None): their reward is 0 (said once)")
        return torch.tensor(totals, dtype=torch.float32)

    def metrics(self) -> dict:
        """rewards/NAME/mean and rewards/NAME/std of every function and of the total, over the rows
        scored since the last call, on every (data) rank (a collective)."""
        sums, self.sums = distributed.all_reduce_sum(self.sums, self.ranks), {}
        return summary(sums)


def float32_scores(values: list, name: str) -> list:
    """`values` (None: not applicable), checked to be representable in float32 (the scores'
    dtype): a finite score beyond its range would become inf there and be dropped as if it were
    not a number."""
    for i, value in enumerate(values):
        if value is not None and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise RewardFunctionError(
                f"the reward function {name} returned {value:g} as score {i}: finite, but beyond "
                f"float32's range (|score| <= {FLOAT32_MAX:.4g}); scale its scores down")
    return values
