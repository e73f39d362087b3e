"""Generalized advantage estimation as a parallel scan (masked whitening is in whiten.py).

GAE is usually a Python loop over time steps. Written over valid positions only (n(t) is the
next valid position after t, and past the last one both value and advantage are 0):
    A_t = r_t + gamma * V_n(t) - V_t + gamma * lam * A_n(t)
Substituting G_t = V_t + lam * A_t turns it into one affine recurrence
    G_t = gamma * lam * G_n(t) + ((1 - lam) * V_t + lam * r_t),   A_t = r_t - V_t + gamma * G_n(t)
and an invalid position passes G through unchanged (the map x -> 1 * x + 0). Affine maps compose
associatively, so each row is one `tl.associative_scan` per block of time steps, walking the row
from its end; the block-to-block carry is the G that enters the block.
"""
from __future__ import annotations

import torch
from .. import checks, cuda_ext, reference
from ..triton_compat import tl, triton
from ..dispatch import backend_for
from ..direct_ops import direct_op

GAE = "gae"


@triton.jit
def _compose(a_full_l, b_full_l, a_tail_l, b_tail_l, a_full, b_full, a_tail, b_tail):
    # Summaries of runs of time steps; the scan runs in reverse, so the `_l` run is the later one.
    # `full` maps the G entering a run (from after its end) to G at its first step; `tail` maps it
    # to the G entering that first step, G_n(first) (a run's steps but its first). Joining an
    # earlier run (right-hand arguments) in front of a later one (the `_l` ones):
    #   full = full o full_l,   tail = tail o full_l.
    return (a_full * a_full_l, a_full * b_full_l + b_full,
            a_tail * a_full_l, a_tail * b_full_l + b_tail)


@triton.jit
def _gae_kernel(
    rewards_ptr,     # [B, T] any float
    values_ptr,      # [B, T] any float
    mask_ptr,        # [B, T] uint8/int, nonzero = valid
    adv_ptr,         # [B, T] fp32 out
    returns_ptr,     # [B, T] fp32 out
    n_steps,         # T
    gamma,
    lam,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * n_steps
    carry = tl.zeros([], dtype=tl.float32)  # G entering from after the row's end: terminal 0
    # Blocks of BLOCK_T steps at multiples of BLOCK_T, latest first, each read in forward order
    # under an index-range mask only: with T a multiple of 16 every stream is 128-bit. Validity is
    # applied by select after the loads (a data-dependent load mask would force scalar accesses).
    for k in range(0, tl.cdiv(n_steps, BLOCK_T)):
        t = (tl.cdiv(n_steps, BLOCK_T) - 1 - k) * BLOCK_T + tl.arange(0, BLOCK_T)
        here = t < n_steps
        valid = here & (tl.load(mask_ptr + row + t, mask=here, other=0) != 0)
        r = tl.load(rewards_ptr + row + t, mask=here, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + row + t, mask=here, other=0.0).to(tl.float32)
        r = tl.where(valid, r, 0.0)
        v = tl.where(valid, v, 0.0)
        # Step t's map of the G entering it: valid G_t = gamma * lam * G_n(t) + (1 - lam) V_t + lam
        # r_t; an invalid step passes G through (identity).
        a = tl.where(valid, gamma * lam, 1.0)
        b = tl.where(valid, (1.0 - lam) * v + lam * r, 0.0)
        ones = tl.full([BLOCK_T], 1.0, tl.float32)
        a_full, b_full, a_tail, b_tail = tl.associative_scan(
            (a, b, ones, tl.zeros_like(b)), axis=0, combine_fn=_compose, reverse=True)
        g_next = a_tail * carry + b_tail       # G_n(t)
        adv = tl.where(valid, r - v + gamma * g_next, 0.0)
        tl.store(adv_ptr + row + t, adv, mask=here)
        tl.store(returns_ptr + row + t, tl.where(valid, adv + v, 0.0), mask=here)
        # The next block (earlier in time) is entered by G at this block's first step.
        carry = tl.sum(tl.where(tl.arange(0, BLOCK_T) == 0, a_full * carry + b_full, 0.0), axis=0)


def _gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
         lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: (advantages, returns) [..., T] fp32 of contiguous inputs."""
    advantages = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    n_steps = rewards.shape[-1]
    n_rows = rewards.numel() // max(n_steps, 1)
    if rewards.numel():
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        block = min(triton.next_power_of_2(n_steps), 1024)
        _gae_kernel[(n_rows,)](
            rewards, values, mask, advantages, returns, n_steps, gamma, lam,
            BLOCK_T=block,
            # 16 steps per thread: the 1-byte mask stream moves 16 bytes per access too.
            num_warps=max(1, min(4, block // 512)),
        )
    return advantages, returns


@direct_op("fusedrl::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
            lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan kernel (no gradient flows through gae: no autograd formula)."""
    return _gae(rewards, values, mask, gamma, lam)


@_gae_op.register_fake
def _gae_fake(rewards, values, mask, gamma, lam):
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    return out, torch.empty_like(out)


def register_cuda_rules() -> None:
    """Fake implementation of the C++ twin fusedrl::cuda_gae (no gradient flows through gae)."""
    torch.library.register_fake("fusedrl::cuda_gae", _gae_fake)


cuda_ext.on_load(register_cuda_rules)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE over the last dim, skipping positions where mask == 0.

    Args:
        rewards, values: [B, T] (any leading dims) float; entries at invalid positions are unread.
        mask: [B, T] bool/integer/float, nonzero = valid. Left/right padding and masked tokens
            inside a response are all skipped: the next valid position bootstraps the previous one.
        gamma, lam: discount and GAE lambda, in [0, 1].
    Returns:
        (advantages, returns) [B, T] fp32; returns = advantages + values on valid positions, both
        0 elsewhere. No gradient flows.
    """
    checks.check_float(GAE, "rewards", rewards)
    checks.check_float(GAE, "values", values)
    checks.check_same_shape(GAE, "values", values, "rewards", rewards)
    mask = checks.mask_arg(GAE, mask, "rewards", rewards, optional=False)
    checks.check_unit_interval(GAE, "gamma", gamma)
    checks.check_unit_interval(GAE, "lam", lam)
    if rewards.dim() < 1:
        raise ValueError(f"{GAE}: rewards must have shape [..., T], got a 0-dim tensor")
    rewards, values = rewards.detach(), values.detach()
    backend = cuda_ext.twin_or_fallback(backend_for(rewards, GAE), rewards, values)
    if backend == "torch":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    op = torch.ops.fusedrl.cuda_gae if backend == "cuda" else _gae_op
    return op(rewards.contiguous(), values.contiguous(), mask.contiguous(), float(gamma),
              float(lam))
