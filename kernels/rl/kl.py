"""Per-token KL penalty between the policy and the reference policy, from sampled-token log-probs.

With d = ref_logp - logp (the log-ratio ref / pi at the sampled token), the estimators of
KL(pi || ref) are (Schulman, "Approximating KL divergence"):
    k1 = -d                  unbiased, high variance, can be negative
    k2 = d**2 / 2            biased, low variance
    k3 = exp(d) - d - 1      unbiased, low variance, always >= 0
One elementwise kernel each way, clamps included, entered through the custom ops
fusedrl::kl_penalty / kl_penalty_grad; the output is fp32 and 0 outside the mask. The "cuda" twin
(csrc/kl_penalty.cu) has no clamps: with a clamp the op runs on Triton.
"""
from __future__ import annotations

from typing import Optional

import torch
from . import statistics
from .. import checks, cuda_ext, reference
from ..triton_compat import tl, triton
from ..dispatch import backend_for
from ..direct_ops import direct_op

OP = "kl_penalty"
ESTIMATORS = ("k1", "k2", "k3")
BLOCK = 1024


@triton.jit
def _kl_terms(logp, ref_logp, log_ratio_clamp, clamp, ESTIMATOR: tl.constexpr,
              HAS_LOG_RATIO_CLAMP: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """(kl, d kl / d logp) for fp32 logp, ref_logp; ESTIMATOR 0, 1, 2 = k1, k2, k3. The log-ratio
    is clamped to +-log_ratio_clamp first and the estimate to +-clamp last (if asked): where either
    clamp is active the estimate is flat in logp, gradient 0 (as torch.clamp's, ends included)."""
    d = ref_logp - logp
    flat = d != d                                # all False, d's shape
    if HAS_LOG_RATIO_CLAMP:
        clamped = tl.minimum(tl.maximum(d, -log_ratio_clamp), log_ratio_clamp)
        flat = clamped != d
        d = clamped
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
    if HAS_CLAMP:
        capped = tl.minimum(tl.maximum(kl, -clamp), clamp)
        flat = flat | (capped != kl)
        kl = capped
    return kl, tl.where(flat, 0.0, dkl)


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
    log_ratio_clamp,  # used only if HAS_LOG_RATIO_CLAMP
    clamp,            # used only if HAS_CLAMP
    ESTIMATOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LOG_RATIO_CLAMP: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs, in_range, valid, logp, ref = _load_block(logp_ptr, ref_ptr, mask_ptr, n_elements,
                                                   HAS_MASK, BLOCK_SIZE)
    kl, _ = _kl_terms(logp, ref, log_ratio_clamp, clamp, ESTIMATOR, HAS_LOG_RATIO_CLAMP, HAS_CLAMP)
    tl.store(out_ptr + offs, tl.where(valid, kl, 0.0), mask=in_range)


@triton.jit
def _kl_bwd_kernel(
    grad_out_ptr,  # [n] upstream gradient (any float), or one value broadcast (GRAD_IS_SCALAR)
    logp_ptr,
    ref_ptr,
    mask_ptr,
    grad_logp_ptr,  # [n] out, logp's dtype; grad w.r.t. ref_logp is its negative
    n_elements,
    log_ratio_clamp,
    clamp,
    ESTIMATOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LOG_RATIO_CLAMP: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    GRAD_IS_SCALAR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs, in_range, valid, logp, ref = _load_block(logp_ptr, ref_ptr, mask_ptr, n_elements,
                                                   HAS_MASK, BLOCK_SIZE)
    if GRAD_IS_SCALAR:
        grad_out = tl.load(grad_out_ptr).to(tl.float32)
    else:
        grad_out = tl.load(grad_out_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    _, dkl = _kl_terms(logp, ref, log_ratio_clamp, clamp, ESTIMATOR, HAS_LOG_RATIO_CLAMP, HAS_CLAMP)
    grad = tl.where(valid, grad_out * dkl, 0.0)
    tl.store(grad_logp_ptr + offs, grad.to(grad_logp_ptr.dtype.element_ty), mask=in_range)


def _mask_arg(mask: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A flat mask the kernels can load (bool viewed as uint8), or a dummy pointer if none."""
    if mask is None:
        return like, False
    mask = mask.reshape(-1)
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask), True


def _launch(kernel, out, tensors, mask, estimator, log_ratio_clamp, clamp, **flags):
    """One elementwise launch over logp's elements (none when empty); a clamp <= 0 is off."""
    n = out.numel()
    if n:
        mask_flat, has_mask = _mask_arg(mask, out)
        kernel[(triton.cdiv(n, BLOCK),)](
            *tensors, mask_flat, out, n, log_ratio_clamp, clamp, ESTIMATOR=estimator,
            HAS_MASK=has_mask, HAS_LOG_RATIO_CLAMP=log_ratio_clamp > 0, HAS_CLAMP=clamp > 0,
            BLOCK_SIZE=BLOCK, **flags)
    return out


def _forward(logp, ref_logp, mask, estimator, log_ratio_clamp, clamp):
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    return _launch(_kl_fwd_kernel, out, (logp, ref_logp), mask, estimator, log_ratio_clamp, clamp)


def _backward(grad_out, logp, ref_logp, mask, estimator, log_ratio_clamp, clamp):
    # kl.sum().backward() hands in one value expanded (all strides 0): read it as one, no copy.
    is_scalar = grad_out.numel() > 0 and all(stride == 0 for stride in grad_out.stride())
    return _launch(_kl_bwd_kernel, torch.empty_like(logp),
                   (grad_out if is_scalar else grad_out.contiguous(),
                   logp, ref_logp), mask, estimator, log_ratio_clamp, clamp,
                   GRAD_IS_SCALAR=is_scalar)


def _setup_context(ctx, inputs, output):
    logp, ref_logp, mask = inputs[:3]
    ctx.save_for_backward(logp, ref_logp, mask)
    ctx.args = inputs[3:]


def _backward_on(grad_op):
    """The autograd formula of a forward op whose backward is grad_op(grad_out, logp, ref_logp,
    mask, *the forward's other arguments): the Triton op's and its C++ twin's."""
    def backward(ctx, grad_out):
        logp, ref_logp, mask = ctx.saved_tensors
        grad_logp = grad_op(grad_out, logp, ref_logp, mask, *ctx.args)
        # Every estimator is a function of ref_logp - logp alone.
        grad_ref = -grad_logp.to(ref_logp.dtype) if ctx.needs_input_grad[1] else None
        return (grad_logp, grad_ref) + (None,) * (1 + len(ctx.args))
    return backward


@direct_op("fusedrl::kl_penalty", mutates_args=())
def _kl_op(logp: torch.Tensor, ref_logp: torch.Tensor, mask: Optional[torch.Tensor], estimator: int,
           log_ratio_clamp: float, clamp: float) -> torch.Tensor:
    """The forward kernel; a clamp <= 0 is off."""
    return _forward(logp, ref_logp, mask, estimator, log_ratio_clamp, clamp)


@_kl_op.register_fake
def _kl_fake(logp, *_args):
    return torch.empty(logp.shape, dtype=torch.float32, device=logp.device)


@direct_op("fusedrl::kl_penalty_grad", mutates_args=())
def _kl_grad_op(grad_out: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                mask: Optional[torch.Tensor], estimator: int, log_ratio_clamp: float,
                clamp: float) -> torch.Tensor:
    return _backward(grad_out, logp, ref_logp, mask, estimator, log_ratio_clamp, clamp)


@_kl_grad_op.register_fake
def _kl_grad_fake(grad_out, logp, *_args):
    return torch.empty_like(logp)


_kl_op.register_autograd(_backward_on(_kl_grad_op), setup_context=_setup_context)


def register_cuda_rules() -> None:
    """Fake implementations and autograd of the C++ twins fusedrl::cuda_kl_penalty_fwd(logp,
    ref_logp, mask, estimator) and fusedrl::cuda_kl_penalty_bwd(grad_out, logp, ref_logp, mask,
    estimator): the Triton op's without the clamps (the twin runs only where they are off)."""
    torch.library.register_fake("fusedrl::cuda_kl_penalty_fwd", _kl_fake)
    torch.library.register_fake("fusedrl::cuda_kl_penalty_bwd", _kl_grad_fake)
    torch.library.register_autograd("fusedrl::cuda_kl_penalty_fwd",
                                    _backward_on(
                                        lambda *args: torch.ops.fusedrl.cuda_kl_penalty_bwd(*args)),
                                    setup_context=_setup_context)


cuda_ext.on_load(register_cuda_rules)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1",
               mask: Optional[torch.Tensor] = None, clamp: Optional[float] = None,
               log_ratio_clamp: Optional[float] = None,
               is_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate, for the reward (k1, InstructGPT) or as a loss term (k3, the
    "low-variance KL" of GRPO; its gradient w.r.t. logp is 1 - ref/pi).

    Args:
        logp: [...] log-probs of the sampled tokens under the policy (any float dtype).
        ref_logp: [...] same shape, under the reference policy.
        estimator: "k1", "k2" or "k3" (see module docstring).
        mask: optional [...] bool/integer/float, nonzero = valid.
        log_ratio_clamp: clamp ref_logp - logp to +-this first (verl and OpenRLHF use 20): one
            token with a huge log-ratio would otherwise swamp a batch (k3 of 20 is e^20).
        clamp: clamp the estimate to +-this (verl uses 10). Gradients w.r.t. logp are 0 where either
        clamp
            is active. None (the default) leaves each off: results as without them.
        is_weight: optional [...] per-token weight of the estimate, e.g. the ratio pi / pi_old
            (TRL's use_bias_correction_kl); differentiable where it requires grad.
    Returns:
        kl [...] fp32, 0 outside the mask; differentiable w.r.t. logp (and ref_logp).
    """
    checks.check_float(OP, "logp", logp)
    checks.check_float(OP, "ref_logp", ref_logp)
    checks.check_same_shape(OP, "ref_logp", ref_logp, "logp", logp)
    mask = checks.mask_arg(OP, mask, "logp", logp)
    if is_weight is not None:
        checks.check_float(OP, "is_weight", is_weight)
        checks.check_same_shape(OP, "is_weight", is_weight, "logp", logp)
        kl = kl_penalty(logp, ref_logp, estimator=estimator, mask=mask, clamp=clamp,
                        log_ratio_clamp=log_ratio_clamp)
        return torch.where(statistics.valid_entries(mask, kl), kl * is_weight.to(kl.dtype), 0.0)
    checks.check_choice(OP, "estimator", estimator, ESTIMATORS)
    for name, value in (("clamp", clamp), ("log_ratio_clamp", log_ratio_clamp)):
        if value is not None:
            checks.check_positive(OP, name, value)
    backend = cuda_ext.twin_or_fallback(backend_for(logp, OP), logp, ref_logp,
                                        supported=clamp is None and log_ratio_clamp is None)
    if backend == "torch":
        # The reference keeps fp64 inputs in fp64 (the oracle's precision); the op returns fp32 on
        # every backend, as its fused kernels do.
        return reference.kl_penalty(logp, ref_logp, estimator=estimator, mask=mask, clamp=clamp,
                                    log_ratio_clamp=log_ratio_clamp).to(torch.float32)
    mask = None if mask is None else mask.contiguous()
    if backend == "cuda":
        return torch.ops.fusedrl.cuda_kl_penalty_fwd(logp.contiguous(), ref_logp.contiguous(), mask,
                                                     ESTIMATORS.index(estimator))
    return _kl_op(logp.contiguous(), ref_logp.contiguous(), mask, ESTIMATORS.index(estimator),
                  float(log_ratio_clamp or 0.0), float(clamp or 0.0))
