"""The one registry of advantage estimators and loss aggregations: their names, which learn from a
critic's values, what each does. Config validation (`ppo.estimator`, `ppo.agg`), the --help text,
the update and docs/algorithms.md read it; fusedrl.kernels names the same ones for its own checks
(GROUP_ESTIMATORS, AGGS; a test holds the two equal). Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: `critic` True when it learns from a critic's values (else it compares
    each prompt's samples_per_prompt responses with each other: a group estimator); `turns` True
    when its group statistics may count each turn of a trajectory as a unit
    (ppo.turn_advantages)."""
    name: str
    critic: bool
    turns: bool
    doc: str


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("gae", True, False, "GAE(gamma, lam) on the critic's values"),
    Estimator("reinforce", True, False, "REINFORCE with the critic as baseline (GAE at lam=1)"),
    Estimator("grpo", False, True, "(score - group mean) / (group std + eps)"),
    Estimator("dr_grpo", False, True, "score - group mean (Dr. GRPO: no std)"),
    Estimator("rloo", False, False, "score - mean of the group's other responses"),
    Estimator("reinforce_pp_baseline", False, False,
              "score - group mean, whitened over the batch (REINFORCE++ with baseline)"),
)}
CRITIC_ESTIMATORS = tuple(name for name, e in ESTIMATORS.items() if e.critic)
GROUP_ESTIMATORS = tuple(name for name, e in ESTIMATORS.items() if not e.critic)
TURN_ESTIMATORS = tuple(name for name, e in ESTIMATORS.items() if e.turns)

AGGREGATIONS: dict[str, str] = {
    "token-mean": "the mean over the minibatch's tokens",
    "seq-mean-token-mean": "each sequence's token mean, averaged over sequences",
    "seq-mean-token-sum": "each sequence's token sum, averaged over sequences",
    "token-sum": "the sum over the minibatch's tokens",
    "seq-mean-token-sum-norm": "the token sum / loss_agg_norm, averaged over sequences",
}

EstimatorName = Literal[tuple(ESTIMATORS)]
AggregationName = Literal[tuple(AGGREGATIONS)]


def described(registry: dict) -> str:
    """'name (what it does) | ...' of a registry, for --help and the docs."""
    return " | ".join(f"{name} ({getattr(entry, 'doc', entry)})"
                      for name, entry in registry.items())
