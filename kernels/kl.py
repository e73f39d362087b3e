"""Per-token KL penalty between the policy and the reference policy, from sampled-token log-probs.

With d = ref_logp - logp (the log-ratio ref / pi at the sampled token), the estimators of
KL(pi || ref) are (Schulman, "Approximating KL divergence"):
    k1 = -d                  unbiased, high variance, can be negative
    k2 = d**2 / 2            biased, low variance
    k3 = exp(d) - d - 1      unbiased, low variance, always >= 0
One elementwise kernel each way; the output is fp32 and 0 outside the mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from . import checks, reference
from .triton_compat import tl, triton
from .dispatch import backend_for, fused_op, kernel_inputs

OP = "kl_penalty"
ESTIMATORS = ("k1", "k2", "k3")
BLOCK = 1024


@triton.jit
def _kl_terms(logp, ref_logp, ESTIMATOR: tl.constexpr):
    """(kl, d kl / d logp) for fp32 logp, ref_logp; ESTIMATOR 0, 1, 2 = k1, k2, k3."""
    d = ref_logp - logp
    if ESTIMATOR == 0:
        kl = -d
        dkl = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:
        kl = 0.5 * d * d
        dkl = -d
    else:
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl = 1.0 - e
    return kl, dkl


@triton.jit
def _load_block(logp_ptr, ref_ptr, mask_ptr, n_elements, HAS_MASK: tl.constexpr,
                BLOCK_SIZE: tl.constexpr):
    """Offsets, in-range flags, validity (in range and mask != 0) and fp32 inputs of one block."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_range = offs < n_elements
    valid = in_range
    if HAS_MASK:
        valid = in_range & (tl.load(mask_ptr + offs, mask=in_range, other=0) != 0)
    # Loaded under the range mask and selected, so the loads vectorize (a data-dependent load mask
    # forces 32-bit accesses).
    logp = tl.where(valid, tl.load(logp_ptr + offs, mask=in_range, other=0.0).to(tl.float32), 0.0)
    ref = tl.where(valid, tl.load(ref_ptr + offs, mask=in_range, other=0.0).to(tl.float32), 0.0)
    return offs, in_range, valid, logp, ref


@triton.jit
def _kl_fwd_kernel(
    logp_ptr,      # [n] any float
    ref_ptr,       # [n] any float
    mask_ptr,      # [n] uint8/int (read only if HAS_MASK)
    out_ptr,       # [n] fp32 out
    n_elements,
    ESTIMATOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs, in_range, valid, logp, ref = _load_block(logp_ptr, ref_ptr, mask_ptr, n_elements,
                                                   HAS_MASK, BLOCK_SIZE)
    kl, _ = _kl_terms(logp, ref, ESTIMATOR)
    tl.store(out_ptr + offs, tl.where(valid, kl, 0.0), mask=in_range)


@triton.jit
def _kl_bwd_kernel(
    grad_out_ptr,  # [n] fp32 upstream gradient
    logp_ptr,
    ref_ptr,
    mask_ptr,
    grad_logp_ptr,  # [n] out, logp's dtype; grad w.r.t. ref_logp is its negative
    n_elements,
    ESTIMATOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs, in_range, valid, logp, ref = _load_block(logp_ptr, ref_ptr, mask_ptr, n_elements,
                                                   HAS_MASK, BLOCK_SIZE)
    grad_out = tl.where(valid, tl.load(grad_out_ptr + offs, mask=in_range, other=0.0), 0.0)
    _, dkl = _kl_terms(logp, ref, ESTIMATOR)
    grad = tl.where(valid, grad_out * dkl, 0.0)
    tl.store(grad_logp_ptr + offs, grad.to(grad_logp_ptr.dtype.element_ty), mask=in_range)


def _mask_arg(mask: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A flat mask the kernels can load (bool viewed as uint8), or a dummy pointer if none."""
    if mask is None:
        return like, False
    mask = mask.reshape(-1).contiguous()
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask), True


@torch.library.custom_op("fusedrl::kl_penalty_fwd", mutates_args=())
def _fwd_op(logp: torch.Tensor, ref_logp: torch.Tensor, mask: Optional[torch.Tensor],
            estimator: int) -> torch.Tensor:
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    if logp.numel():
        mask_flat, has_mask = _mask_arg(mask, logp)
        _kl_fwd_kernel[(triton.cdiv(logp.numel(), BLOCK),)](
            logp, ref_logp, mask_flat, out, logp.numel(), ESTIMATOR=estimator, HAS_MASK=has_mask,
            BLOCK_SIZE=BLOCK,
        )
    return out


@_fwd_op.register_fake
def _fwd_fake(logp, ref_logp, mask, estimator):
    return torch.empty(logp.shape, dtype=torch.float32, device=logp.device)


@torch.library.custom_op("fusedrl::kl_penalty_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
            mask: Optional[torch.Tensor], estimator: int) -> torch.Tensor:
    grad = torch.empty_like(logp)
    if logp.numel():
        mask_flat, has_mask = _mask_arg(mask, logp)
        _kl_bwd_kernel[(triton.cdiv(logp.numel(), BLOCK),)](
            grad_out.float().contiguous(), logp, ref_logp, mask_flat, grad, logp.numel(),
            ESTIMATOR=estimator, HAS_MASK=has_mask, BLOCK_SIZE=BLOCK,
        )
    return grad


@_bwd_op.register_fake
def _bwd_fake(grad_out, logp, ref_logp, mask, estimator):
    return torch.empty_like(logp)


def _setup_context(ctx, inputs, output):
    logp, ref_logp, mask, estimator = inputs
    ctx.save_for_backward(logp, ref_logp, mask)
    ctx.estimator = estimator


def _backward_on(backend: str):
    """The autograd formula of the forward op of ``backend``: its own backward op."""
    def backward(ctx, grad_out):
        logp, ref_logp, mask = ctx.saved_tensors
        grad_logp = fused_op(backend, "kl_penalty_bwd")(grad_out, logp, ref_logp, mask, ctx.estimator)
        # Every estimator is a function of ref_logp - logp alone.
        grad_ref = -grad_logp.to(ref_logp.dtype) if ctx.needs_input_grad[1] else None
        return grad_logp, grad_ref, None, None
    return backward


_fwd_op.register_autograd(_backward_on("triton"), setup_context=_setup_context)


def register_cuda_rules() -> None:
    """Fake implementations and autograd of the C++ twins fusedrl::cuda_kl_penalty_*."""
    torch.library.register_fake("fusedrl::cuda_kl_penalty_fwd", _fwd_fake)
    torch.library.register_fake("fusedrl::cuda_kl_penalty_bwd", _bwd_fake)
    torch.library.register_autograd("fusedrl::cuda_kl_penalty_fwd", _backward_on("cuda"),
                                    setup_context=_setup_context)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1",
               mask: Optional[torch.Tensor] = None, clamp: Optional[float] = None,
               log_ratio_clamp: Optional[float] = None) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate, for the reward (k1, InstructGPT) or as a loss term (k3, the
    "low-variance KL" of GRPO; its gradient w.r.t. logp is 1 - ref/pi).

    Args:
        logp: [...] log-probs of the sampled tokens under the policy (any float dtype).
        ref_logp: [...] same shape, under the reference policy.
        estimator: "k1", "k2" or "k3" (see module docstring).
        mask: optional [...] bool/integer, nonzero = valid.
        log_ratio_clamp: clamp ref_logp - logp to +-this first (verl and OpenRLHF use 20): one
            token with a huge log-ratio would otherwise swamp a batch (k3 of 20 is e^20).
        clamp: clamp the estimate to +-this (verl uses 10). Gradients w.r.t. logp are 0 where either clamp
            is active. None (the default) leaves each off: results as without them.
    Returns:
        kl [...] fp32, 0 outside the mask; differentiable w.r.t. logp (and ref_logp).
    """
    checks.check_float(OP, "logp", logp)
    checks.check_float(OP, "ref_logp", ref_logp)
    checks.check_same_shape(OP, "ref_logp", ref_logp, "logp", logp)
    if mask is not None:
        checks.check_mask(OP, mask, "logp", logp)
    checks.check_choice(OP, "estimator", estimator, ESTIMATORS)
    for name, value in (("clamp", clamp), ("log_ratio_clamp", log_ratio_clamp)):
        if value is not None:
            checks.check_positive(OP, name, value)
    if log_ratio_clamp is not None:
        # Where |ref - logp| exceeds the bound, a constant logp with the clamped log-ratio stands in
        # for it: the estimate sees the clamped value and its gradient there is 0.
        d = (ref_logp.float() - logp.float()).detach()
        clamped = d.abs() > log_ratio_clamp
        logp = torch.where(clamped, ref_logp.float().detach() - d.clamp(-log_ratio_clamp, log_ratio_clamp),
                           logp.float())
    backend = backend_for(logp)
    if backend == "torch":
        kl = reference.kl_penalty(logp, ref_logp, estimator=estimator, mask=mask)
    else:
        logp, ref_logp = kernel_inputs(backend, logp, ref_logp)
        kl = fused_op(backend, "kl_penalty_fwd")(
            logp.contiguous(), ref_logp.contiguous(), None if mask is None else mask.contiguous(),
            ESTIMATORS.index(estimator))
    return kl if clamp is None else kl.clamp(-clamp, clamp)
