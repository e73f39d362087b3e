"""The router's auxiliary losses of a mixture-of-experts model, added to a stage's loss.

`router_losses(trace, top_k)` computes them from the router logits one forward recorded
(engine/model/moe.py's routing_trace); `with_router_losses(loss_fn, cfg)` wraps a stage's loss
function so that each forward adds coef x loss, weighted by the forward's share of the step (the
stage's own loss is already divided by the step's counts, so the step's router loss is the mean
of its forwards' over their share).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config.moe import RouterLossConfig
from ..model.moe import balance_probs, moe_blocks, routing_trace


def router_losses(logits: list[torch.Tensor], chosen: list[torch.Tensor], num_experts: int,
                  scoring_func: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per sparse layer router logits [N, E] and chosen experts [N, k] -> (load-balancing loss,
    z-loss), fp32 scalars over all the layers' tokens together, as transformers'
    load_balancing_loss_func: E * sum_e (slots routed to e / rows) * (mean router probability of e),
    rows = tokens x layers. A sigmoid router's probability of e is its score normalized over the
    experts, s_e / sum_j s_j (moe.balance_probs: DeepSeek-V3's balance loss, over the batch's tokens
    rather than per sequence)."""
    z = torch.cat([l.float() for l in logits])  # [L*N, E]
    slots = torch.cat(chosen).reshape(-1)  # [L*N*k]
    routed = torch.zeros(num_experts, device=z.device).index_add_(0, slots,
                                                                  torch.ones(slots.shape,
                                                                             device=z.device))
    balance = num_experts * (
        routed / max(z.shape[0], 1) * balance_probs(z, scoring_func).mean(0)).sum()
    return balance, torch.logsumexp(z, dim=-1).square().mean()


def trace_losses(model, trace, cfg: RouterLossConfig) -> tuple[torch.Tensor, dict]:
    """The coef-weighted router losses of the forwards `trace` recorded (an MoE `model`'s), and
    their values as stats ("router_aux_loss", "router_z_loss")."""
    layers = sorted(trace.logits)
    moe = moe_blocks(model)[0].moe
    balance, z = router_losses([trace.logits[i] for i in layers], [trace.chosen[i] for i in layers],
                               moe.num_experts, moe.scoring_func)
    loss = cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z
    return loss, {"router_aux_loss": balance.detach(), "router_z_loss": z.detach()}


def with_router_losses(loss_fn: Callable, cfg: RouterLossConfig, share: Callable) -> Callable:
    """loss_fn(model, batch, step_counts) -> (loss, stats) plus the router losses of its forward,
    coef-weighted and times share(batch, step_counts) (the forward's part of the step); the stats
    gain their weighted values ("router_aux_loss", "router_z_loss"). loss_fn itself when cfg asks
    for none."""
    if not cfg.enabled:
        return loss_fn

    def loss_with_router_losses(model, batch, step_counts):
        if not moe_blocks(model):
            return loss_fn(model, batch, step_counts)
        with routing_trace(model) as trace:
            loss, stats = loss_fn(model, batch, step_counts)
        extra, router = trace_losses(model, trace, cfg)
        weight = share(batch, step_counts)
        return loss + weight * extra, {**stats,
                                       **{name: weight * value for name, value in router.items()}}

    return loss_with_router_losses
