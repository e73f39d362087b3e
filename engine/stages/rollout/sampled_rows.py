"""What every rollout mode hands on, and everything after sampling, run once for all of them.

The run's one rollout interface (sampler.py) samples `Generated` rows, whatever its rows
(single-turn answers: answer_rows.py, a trajectory of one turn; multi-turn trajectories:
agent_rows.py) and its schedule (whole groups, or partial rollouts: partial.py).
`score_generated` (the run's settings held by `Scoring`) then does the rest alike for every mode:
the one pack (prefix sharing where the run asks for it), routing replay's records, the reward model
or functions plus the environment's rewards (per turn with reward.per_turn: turn_credit.py), and
overlong shaping on each model turn. What the options did to the rows is counted from the Samples,
again for every mode (experience.applied_metrics).

Rows are ordered prompt by prompt, sample by sample, so rows g*n .. g*n + n - 1 are group g.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...data.device_tensors import device_tensor
from ...config.ppo import PPOConfig
from ...config.rollout import RolloutConfig
from ...inference.sampling_params import SamplingParams
from .models import PPOModels
from .packs import pack_rollout
from .phase_timer import PhaseTimer
from .scored_rows import Samples
from .reward_scores import score_rows
from .turn_credit import per_turn, turn_returns, turn_spans


@dataclass
class Generated:
    """R = groups * n sampled rows. sampler_logprobs [sum of model tokens] fp32, row after row;
    sources: [groups] each group's prompt row (data/prompts.py PromptRow; None: the decoded
    prompts stand in for the reward functions); model_masks: [R] one bool per response token,
    True where the model sampled it (None: every token, single-turn answers); env_rewards: [R]
    each turn's environment reward (None: no environment); trajectories: [R] the multi-turn rows'
    engine/agents AgentTrajectory (None: single-turn), which the reward functions read; routing:
    the sampler's expert choices of every prompt and response token [sum of the rows' lengths,
    sparse layers, k] int16, rows as pack_rollout packs them, -1 where a token has none (routing
    replay of an MoE policy; None: off)."""
    prompts: list[list[int]]
    responses: list[list[int]]
    sampler_logprobs: torch.Tensor
    n: int
    sources: list | None = None
    model_masks: list[list[bool]] | None = None
    env_rewards: list[list[float]] | None = None
    trajectories: list | None = None
    routing: torch.Tensor | None = None

    @property
    def images(self) -> list | None:
        """[R] each row's images (its prompt row's ImageInputs, None for text); None: no row has
        any."""
        rows = [getattr(p, "images", None) for p in self.sources or () for _ in range(self.n)]
        return rows if any(i is not None for i in rows) else None


def sampled_routing(models: PPOModels) -> torch.Tensor | None:
    """The routing records of the actor's last generation call (HybridActor.last_routing: every
    way of generating keeps them, row after row), None without routing replay."""
    return models.actor.last_routing if models.actor.record_routing else None


def sampling_params(rollout: RolloutConfig, seed: int | None = None, n: int = 1) -> SamplingParams:
    """How every rollout mode samples, from the rollout section: n samples per prompt, `seed`
    their stream (None: each row brings its own, partial rollouts); the template's end of turn is
    added where turns end (engine/agents)."""
    return SamplingParams(n=n, temperature=rollout.temperature, top_k=rollout.top_k,
                          top_p=rollout.top_p, max_new_tokens=rollout.max_new_tokens,
                          ignore_eos=rollout.ignore_eos, seed=seed)


def same_on_context_ranks(models: PPOModels, generated: Generated) -> Generated:
    """`generated` as the first rank of this rank's context group sampled it (every rank of a
    context group samples the group's rows: they train its first rank's), for every rollout mode;
    itself without context parallelism."""
    cp = models.policy.context_parallel
    if cp is None:
        return generated
    device = generated.sampler_logprobs.device
    first = cp.same_on_ranks(dataclasses.replace(
        generated, sampler_logprobs=generated.sampler_logprobs.cpu()))
    return dataclasses.replace(first, sampler_logprobs=first.sampler_logprobs.to(device))


def overlong_penalty(lengths: list[int], max_new_tokens: int, buffer: int,
                     penalty: float) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), lengths [R] -> [R] <= 0: 0 up to
    max_new_tokens - buffer, then falling linearly to -penalty at max_new_tokens (host numbers:
    the lengths are host lists, and the penalized are counted)."""
    if buffer == 0:
        return [0.0] * len(lengths)
    return [-penalty * min(max(n - (max_new_tokens - buffer), 0), buffer) / buffer
            for n in lengths]


def score_generated(models: PPOModels, generated: Generated, rollout: RolloutConfig,
                    timer: PhaseTimer, share_prompts: bool = False,
                    turn_gamma: float | None = None) -> Samples:
    """The Samples of generated rows: packed once (share_prompts, train.prefix_sharing: a group's
    rows read its prompt once in every forward), routed as the sampler routed (routing replay),
    scored by models.score (the trajectory after its prompt is the completion) plus the
    environment's rewards, and overlong-shaped by each row's longest model turn (each turn is
    limited by rollout.max_new_tokens). turn_gamma (reward.turn_gamma with reward.per_turn; None:
    off): the environment's rewards count discounted across turns in the scores and are kept per
    turn for their placement (turn_credit.py). Timed as "score"."""
    generated = same_on_context_ranks(models, generated)
    device = models.actor.device  # where the policy runs (its resting shards may be on CPU)
    packed = pack_rollout(generated.prompts, generated.responses, device,
                          share_prompts=share_prompts and generated.n > 1,
                          model_masks=generated.model_masks, images=generated.images)
    if generated.routing is not None:  # the training forwards route as the sampler did
        packed = packed._replace(routing=generated.routing.to(device))
    n = generated.n
    rows = None if generated.sources is None else [p for p in generated.sources for _ in range(n)]
    masks = generated.model_masks or [None] * len(generated.responses)
    spans = [turn_spans(m, len(x)) for m, x in zip(masks, generated.responses)]
    with timer.phase("score"), torch.no_grad():
        scores = torch.zeros(len(generated.responses), dtype=torch.float32, device=device)
        if models.score is not None:
            scores += score_rows(models.score, generated.prompts, generated.responses, packed,
                                 rollout.forward_tokens, rows, models.ranks,
                                 generated.trajectories).float().to(device)
    turn_rewards = None
    if generated.env_rewards is not None:
        turn_rewards = [per_turn(x, len(s)) for x, s in zip(generated.env_rewards, spans)]
        gamma = 1.0 if turn_gamma is None else turn_gamma
        env = [turn_returns(x, gamma)[0] if x else 0.0 for x in turn_rewards]
        scores += device_tensor(env, torch.float32, device)
    longest = [max((e - s for s, e in row), default=0) for row in spans]
    penalties = overlong_penalty(longest, rollout.max_new_tokens, rollout.overlong_buffer,
                                 rollout.overlong_penalty)
    per_turn_on = turn_gamma is not None and turn_rewards is not None
    return Samples(generated.prompts, generated.responses, packed,
                   packed.to_grid(generated.sampler_logprobs.to(device)),
                   scores + device_tensor(penalties, torch.float32, device), n, rows, penalties,
                   spans if per_turn_on else None, turn_rewards if per_turn_on else None)


@dataclass(frozen=True)
class Scoring:
    """Everything after sampling with a run's settings: Scoring(...)(generated, timer) is
    score_generated's Samples."""
    models: PPOModels
    rollout: RolloutConfig
    share_prompts: bool = False        # train.prefix_sharing
    turn_gamma: float | None = None    # reward.turn_gamma with reward.per_turn, else None

    @classmethod
    def of(cls, cfg: PPOConfig, models: PPOModels) -> "Scoring":
        return cls(models, cfg.rollout, cfg.train.shares_prefixes,
                   cfg.reward.turn_gamma if cfg.reward.per_turn else None)

    def __call__(self, generated: Generated, timer: PhaseTimer) -> Samples:
        return score_generated(self.models, generated, self.rollout, timer, self.share_prompts,
                               self.turn_gamma)
