"""Turn-level credit of multi-turn trajectories (reward.per_turn): each environment reward at the
last model token of its turn, discounted across turns by reward.turn_gamma, and with
ppo.turn_advantages each turn a unit of the group's statistics (AReaL's turn-level advantages).

A turn is a run of the model's tokens in a trajectory's response (its model mask); the
environment's tokens between turns are context. A single-turn answer is one turn.
"""
from __future__ import annotations

import numpy as np
import torch

from ...config.estimators import TURN_ESTIMATORS
from ...data.device_tensors import device_tensor


def turn_spans(model_mask: list[bool] | None, length: int) -> list[tuple[int, int]]:
    """[start, end) response columns of each turn: each run of True in `model_mask` (None: the
    whole response of `length` tokens, one turn)."""
    if model_mask is None:
        return [(0, length)] if length else []
    spans, start = [], None
    for column, sampled in enumerate(list(model_mask) + [False]):
        if sampled and start is None:
            start = column
        elif not sampled and start is not None:
            spans.append((start, column))
            start = None
    return spans


def per_turn(rewards: list[float], turns: int) -> list[float]:
    """A trajectory's environment rewards, one per turn: those of turns no step answered (the last,
    cut by a limit) 0; a reward past the last turn counts on it."""
    if not turns:
        return []
    out = list(rewards[:turns]) + [0.0] * (turns - len(rewards))
    out[-1] += sum(rewards[turns:])
    return out


def turn_returns(rewards: list[float], gamma: float) -> list[float]:
    """Each turn's discounted return to go: G_k = r_k + gamma * G_{k+1}."""
    returns, to_go = [], 0.0
    for reward in reversed(rewards):
        to_go = reward + gamma * to_go
        returns.append(to_go)
    return returns[::-1]


def place_turn_rewards(rewards: torch.Tensor, spans: list[list[tuple[int, int]]],
                       values: list[list[float]]) -> torch.Tensor:
    """rewards [R, T] with values[r][k] added at row r's column spans[r][k][1] - 1 (turn k's last
    model token). The places and values go to the device in two copies it does not wait for
    (device_tensor): a list index or `torch.tensor(..., device=)` there waits for the stream."""
    index = [(r, end - 1, value) for r, (row, vals) in enumerate(zip(spans, values))
             for (_, end), value in zip(row, vals)]
    if not index:
        return rewards
    rows, columns, added = zip(*index)
    places = device_tensor(np.array([rows, columns], dtype=np.int64), torch.int64, rewards.device)
    delta = torch.zeros_like(rewards)
    delta[places[0], places[1]] = device_tensor(added, rewards.dtype, rewards.device)
    return rewards + delta


def turn_token_advantages(returns: list[list[float]], spans: list[list[tuple[int, int]]],
                          mask: torch.Tensor, n: int, estimator: str,
                          eps: float = 1e-6) -> torch.Tensor:
    """Turn-level group advantages [R, T] fp32: every turn of a group's n trajectories is one
    sample of the group's statistics; a turn's tokens get (G - mean) / (std + eps) (grpo, unbiased
    std) or G - mean (dr_grpo), G its return to go. returns, spans: [R] per turn; mask [R, T].
    Built on the host in float64 and sent once (device_tensor)."""
    if estimator not in TURN_ESTIMATORS:
        raise ValueError(
            f"turn_token_advantages: estimator {estimator!r}: expected one of {TURN_ESTIMATORS}")
    out = np.zeros(tuple(mask.shape), dtype=np.float64)
    for g in range(len(returns) // n):
        rows = range(g * n, (g + 1) * n)
        pooled = np.array([x for r in rows for x in returns[r]], dtype=np.float64)
        if pooled.size == 0:
            continue
        mean = pooled.mean()
        std = pooled.std(ddof=1) if pooled.size > 1 else 0.0
        for r in rows:
            for (start, end), value in zip(spans[r], returns[r]):
                centered = value - mean
                out[r, start:end] = centered / (std + eps) if estimator == "grpo" else centered
    advantages = device_tensor(out, torch.float32, mask.device)
    return torch.where(mask.bool(), advantages, 0.0)
