"""The one LM-head log-prob path under autocast: the op's backward differentiates the same bf16
forward it ran (the bug it fixes: autocast reached inside the custom op, so the forward ran in bf16
and the backward recomputed fp32 logits against the bf16 logsumexp)."""
import pytest
import torch

from fusedrl.engine.model.lm_head import lm_head_logprobs
from fusedrl.kernels import use_backend
from fusedrl.kernels.dispatch import backend_for, model_backend
from kernel_testing import needs_interpreter


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_interpreter)])  # CPU tensors
def test_autocast_forward_and_backward_are_the_same_bf16_function(backend):
    """auto: the head takes the model's backend (torch for CPU tensors, even under the
    interpreter); triton: the fused kernels, asked for by name."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, requires_grad=True)
    weight = torch.randn(203, 24, requires_grad=True)
    labels = torch.randint(0, 203, (37,))
    with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        logp = lm_head_logprobs(hidden, weight, labels, temperature=0.7)
        fused = model_backend(hidden) == "triton" and backend_for(hidden) == "triton"
    upstream = torch.randn(37)
    got_h, got_w = torch.autograd.grad(logp, (hidden, weight), upstream)

    # Reference: the same bf16 operands, the logits' softmax in float64. The logits as the op makes
    # them: the fused Triton GEMM (16-bit inputs on the Triton backend) keeps its fp32 accumulators,
    # the torch backend's matmul rounds them to bf16.
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    if fused:
        logits = (h16.double() @ w16.double().T) / 0.7
    else:
        logits = (h16 @ w16.T).double() / 0.7
    ref = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    ref_h, ref_w = torch.autograd.grad(ref, (h16, w16), upstream.double())
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref, atol=2e-2, rtol=0)
    # bf16 operands: gradients agree to bf16's resolution (an fp32 recompute against the bf16
    # logsumexp is off by the bf16 logits' rounding, ~1e-1 on these O(10) logits).
    torch.testing.assert_close(got_w.double(), ref_w.double(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got_h.double(), ref_h.double(), atol=3e-2, rtol=2e-2)
