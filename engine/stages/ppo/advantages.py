"""From a rollout's scores to its per-token advantages, the pure math of a PPO iteration between
the kernels and the trainer: which rows to keep, the KL-shaped per-token rewards, GAE or group
advantages, the adaptive KL coefficient and the running reward moments.

Everything per token is [R, T] with one mask (True on the response tokens that are scored and
trained); nothing here syncs with the host but the finite-score check (which rows to keep: one
read), the KL controller and the running reward moments, which keep Python floats (one read).
Formulas: per-token reward as in Ziegler et al. 2019 / InstructGPT (``-beta * KL_t``, plus the
reward model's score on the last response token); the adaptive KL coefficient as in Ziegler et al.
(proportional control toward a target KL); REINFORCE with a baseline as GAE with lambda = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...config.estimators import CRITIC_ESTIMATORS
from ....kernels import SumOver, gae, masked_moments, masked_whiten


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """mask [R, T] -> index of each row's last True [R] (0 for an empty row; see has_valid)."""
    steps = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), steps, -1).amax(dim=-1).clamp_min(0)



def finite_rows(finite: list[bool], group_size: int | None = None) -> list[int]:
    """Indices of the rows to keep: those whose score is finite (`finite` [R], read from the
    device by the caller), or with `group_size`, the rows of the groups (consecutive runs of
    group_size rows: one prompt's samples) whose every score is: with a group estimator one
    non-finite score spoils its whole group's baseline."""
    if group_size is None:
        return [r for r, ok in enumerate(finite) if ok]
    return [g * group_size + k for g in range(len(finite) // group_size)
            if all(finite[g * group_size:(g + 1) * group_size]) for k in range(group_size)]


def shape_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every valid token, plus the sequence's score on its last.

    kl [R, T] (0 off the mask, e.g. from kernels.kl_penalty), scores [R], mask [R, T] -> [R, T]
    fp32. A row with no valid token gets no reward at all.
    """
    if kl.shape != mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(f"shape_rewards: expected kl and mask [R, T] and scores [R], got kl "
                         f"{tuple(kl.shape)}, mask {tuple(mask.shape)}, scores "
                         f"{tuple(scores.shape)}")
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl.float(), 0.0)
    last = last_valid_index(valid)
    bonus = torch.where(valid.any(dim=-1), scores.float(), 0.0)
    return rewards.scatter_add(-1, last[:, None], bonus[:, None])


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                           estimator: str = "gae", gamma: float = 1.0, lam: float = 0.95,
                           whiten: bool = True, sum_over: SumOver = None) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """(advantages, returns) [R, T] from per-token rewards and the critic's values.

    estimator "gae": GAE(gamma, lam). "reinforce": REINFORCE with the critic as baseline,
    A_t = G_t - V_t with G_t the discounted reward-to-go, which is GAE with lam = 1.
    Advantages are whitened over the valid tokens when ``whiten`` (every rank's, with sum_over the
    ranks' sum: see kernels.masked_whiten); returns are not.
    """
    if estimator not in CRITIC_ESTIMATORS:
        raise ValueError(
            f"advantages_and_returns: unknown estimator {estimator!r}; expected one of "
            f"{CRITIC_ESTIMATORS}")
    advantages, returns = gae(rewards, values, mask, gamma=gamma,
                              lam=1.0 if estimator == "reinforce" else lam)
    if whiten:
        advantages = masked_whiten(advantages, mask, sum_over=sum_over)
    return advantages, returns


@dataclass
class KLController:
    """The KL penalty coefficient beta. Fixed when ``target`` is None; otherwise adaptive (Ziegler
    et al. 2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon, so beta rises
    while the measured KL is above target and falls while it is below."""
    value: float
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self):
        if not (isinstance(self.value, (int, float)) and self.value >= 0
                and math.isfinite(self.value)):
            raise ValueError(
                f"KLController: value must be a finite number >= 0, got {self.value!r}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"KLController: target must be > 0 or None, got {self.target!r}")
        if self.horizon <= 0:
            raise ValueError(f"KLController: horizon must be > 0, got {self.horizon!r}")

    def update(self, measured_kl: float, n_samples: int) -> float:
        """Feed the KL measured over ``n_samples`` sequences; returns the new coefficient."""
        # a NaN KL says nothing about beta
        if self.target is not None and math.isfinite(measured_kl):
            error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


class RunningMoments:
    """Running mean and std of scalar scores (Chan et al.'s parallel update), for reward
    normalization: ``normalize(scores)`` updates the moments with the batch, then returns
    (scores - mean) / std, clipped to +-clip if given."""

    def __init__(self, clip: float | None = None, eps: float = 1e-8):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.clip, self.eps = clip, eps

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def update(self, scores: torch.Tensor) -> None:
        """Add the batch's finite scores (a NaN or inf would poison the moments for good)."""
        batch = scores.detach().double().flatten()
        finite = torch.isfinite(batch)
        mean, var = masked_moments(batch, finite, unbiased=False)
        # one host read
        n, batch_mean, batch_var = torch.stack([finite.sum().double(), mean[0], var[0]]).tolist()
        n = int(n)
        if n == 0:
            return
        batch_m2 = batch_var * n
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        self.update(scores)
        out = (scores.float() - self.mean) / (self.std + self.eps)
        return out.clamp(-self.clip, self.clip) if self.clip is not None else out

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
