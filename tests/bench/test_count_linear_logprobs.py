"""bench/count_linear_logprobs counts linear_token_logprobs' launches per chunk: a matmul and the
token_logprobs kernel per row chunk forward; per vocabulary chunk backward the recompute, the
gradient kernel, the d weight slice and d hidden's matmul and accumulation."""
import torch

import count_linear_logprobs
from kernel_testing import needs_interpreter

pytestmark = needs_interpreter


def test_launches_per_chunk():
    counted = count_linear_logprobs.count(50, 16, 300, 16, torch.bfloat16)
    forward, backward = counted["forward"], counted["backward"]
    assert forward["ops"] == {"aten::mm": 4, "triton:_token_logprobs_fwd_kernel": 4}  # 4 row chunks
    # 4 vocabulary chunks of 75 columns (16 rows' worth of 300 logits over 50 rows, made even)
    assert backward["ops"] == {"aten::zeros": 1, "aten::new_empty": 1, "aten::mm": 8,
                               "triton:_token_logprobs_bwd_kernel": 4, "aten::mm.out": 4,
                               "aten::add_.Tensor": 4, "aten::_to_copy": 1}
    # Forward: each bf16 logit and each row's label logit read once, the int64 labels, logp and lse
    # (fp32) written. Backward, per vocabulary chunk: labels, lse and the upstream gradient read,
    # each logit read once and its gradient written once.
    assert forward["triton_bytes"] == 50 * (301 * 2 + 8 + 2 * 4)
    assert backward["triton_bytes"] == 4 * 50 * (8 + 4 + 4) + 2 * 50 * 300 * 2


def test_fused_path_writes_no_logits_forward_and_each_gradient_once():
    """The fused GEMMs: forward is two launches and stores only per-row states (4 fp32 per split
    and row) and the outputs; backward stores each logit's gradient once (2 bytes, bf16) per
    vocabulary chunk and runs no row kernel."""
    counted = count_linear_logprobs.count(50, 16, 300, 16, torch.bfloat16, fuse_matmul=True)
    forward, backward = counted["forward"], counted["backward"]
    assert forward["ops"] == {"triton:_lse_partials_kernel": 1,
                              "triton:_lse_combine_kernel": 1}
    assert forward["triton_stored"] == 50 * 4 * 4 + 50 * 2 * 4  # 1 split: states; logp and lse
    assert backward["ops"] == {"aten::zeros": 1, "aten::new_empty": 1,
                               "triton:_logit_grad_kernel": 4, "aten::mm": 4, "aten::mm.out": 4,
                               "aten::add_.Tensor": 4, "aten::_to_copy": 1}
    assert backward["triton_stored"] == 50 * 300 * 2
