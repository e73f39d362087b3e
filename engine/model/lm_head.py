"""The one LM-head log-prob path of every trainer: hidden rows -> log p(label) (and entropy)
through the fused `linear_token_logprobs`, so the [rows, V] logits never exist.

Under autocast the head runs in the autocast dtype, as nn.Linear would, but with both operands cast
here and autocast off inside the op: its backward recomputes the logits from the saved inputs, and
must do so in the dtype its forward used (autocast is not active during backward; letting autocast
reach inside the custom op gave a bf16 forward and an fp32 recompute against the bf16 logsumexp).
"""
from __future__ import annotations

import contextlib

import torch

from ...kernels import linear_token_logprobs, model_backend, use_backend
from ..ranks.tensor_parallel_ops import vocab_parallel_logprobs


def head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LM head computes in: the autocast dtype when autocast is on, else the
    weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def sampler_bias(model, device=None) -> torch.Tensor | None:
    """The logit bias [V] fp32 the engine's sampler draws `model`'s tokens under: a vision-language
    model's -inf at its vision ids (VisionLanguageModel.logit_bias), None for a text model; what
    training's log-probs and a distillation's divergence add, so that they are of the sampler's
    distribution."""
    if getattr(model.config, "vision", None) is None:
        return None
    return model.logit_bias(device)


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                     temperature: float = 1.0, with_entropy: bool = False, bias=None):
    """hidden [M, H] (the rows predicting `labels`), weight [V, H], labels [M] -> fp32 log-probs [M]
    under softmax(logits / temperature), and with_entropy: (log-probs [M], entropy [M]). bias [V]
    (fp32) is added to the logits: a vision-language model's -inf at its vision ids, the mask its
    sampler draws under (VisionLanguageModel.logit_bias)."""
    dtype = head_dtype(hidden, weight)
    # a tensor-parallel LM head (engine/parallel/tensor_parallel.py): its vocabulary rows
    if hasattr(weight, "to_local"):
        group = weight.device_mesh.get_group()
        start = weight.device_mesh.get_local_rank() * -(
            -weight.shape[0] // weight.device_mesh.size())
        with torch.autocast(hidden.device.type, enabled=False):
            return vocab_parallel_logprobs(hidden.to(dtype), weight.to_local().to(dtype), labels,
                                           start, group, temperature, with_entropy, bias=bias)
    # The head runs on the model's backend, as the decoder walk does: "auto" keeps CPU tensors on
    # torch even under TRITON_INTERPRET=1 (a training run's head in the interpreter took two thirds
    # of its time); asked for by name, or on CUDA, the op decides as it always does.
    on_torch = model_backend(hidden) == "torch"
    with torch.autocast(hidden.device.type, enabled=False), \
            use_backend("torch") if on_torch else contextlib.nullcontext():
        return linear_token_logprobs(hidden.to(dtype), weight.to(dtype), labels,
                                     bias=None if bias is None else bias.to(dtype),
                                     temperature=temperature, return_entropy=with_entropy)
