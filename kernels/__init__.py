"""fusedrl.kernels: fused RLHF ops (Triton) with plain PyTorch references.

Every op validates its inputs, then runs on the backend chosen by ``fusedrl.kernels.dispatch``:
Triton for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), the PyTorch reference
otherwise; ``use_backend(...)`` and ``FUSEDRL_BACKEND`` override, including "cuda": the optional
compiled kernels of csrc/ (``fusedrl.kernels.cuda_ext``, see BACKENDS.md). The ops are registered as
torch custom ops (namespace ``fusedrl``), so torch.compile traces through them; eager calls skip the
custom-op wrapper (direct_ops.py). Without triton
installed the package still imports and every op runs on the torch backend.

The RL statistics (masked mean, moments and whitening, loss aggregation, the IS/GSPO corrections,
group advantages) are written once, in statistics.py; the ones that pool entries take `sum_over`,
the ranks' sum, and give every rank what one process computes on all ranks' rows.

The model's ops (the engine's only way in): `rms_norm`, `rope` (and `mrope`, M-RoPE's),
`silu_mul`, `norm_linear` (a decode step's norm + projection), the mixture-of-experts layer's
`moe_sort`, `moe_permute`, `grouped_linear` and `moe_unpermute`, `store_kv` and
`rope_store_decode` (the paged KV cache), `sample_triton` with its `SamplerWorkspace`, and `exact`,
the batch-invariant mode's ops. The decider's questions (`backend_for`, `model_backend`, ...)
come from `dispatch`, the one place that reads the environment and looks at devices to choose an
implementation; attention's (`attention_backend`) from `fusedrl.kernels.attention`, the public
subpackage that holds every attention path the engine calls. `compile_ahead` compiles a job's
recorded Triton launches in child processes before its first launch (ahead_of_time.py).
"""
if __name__ != "fusedrl.kernels":
    # The repository root is on sys.path and this folder was imported as `kernels`: see shadowed.py.
    from .shadowed import stand_aside
    stand_aside(__name__, __file__)
else:
    from . import reference
    from .ahead_of_time import compile_ahead
    from .dispatch import (BACKENDS, backend_for, fused_for_model, model_backend, requested_backend,
                           triton_interpreting, use_backend)
    from .attention import attention_backend, flash_attn, rope_store_decode, store_kv
    from .rl.advantages import gae
    from .rl.whiten import masked_whiten
    from .rl.statistics import (AGGS, GROUP_ESTIMATORS, IS_LEVELS, IS_MODES, SumOver, aggregate,
                                aggregation_rule, explained_variance, group_advantages,
                                importance_weights, masked_mean, masked_moments)
    from .rl.kl import kl_penalty
    from .rl.linear_logprobs import linear_token_logprobs
    from .rl.distill import DistillOutput, linear_distill_divergence
    from .rl.ppo_loss import ppo_policy_loss, ppo_value_loss
    from .rl.logprobs import token_logprobs
    from .model.norm import rms_norm
    from .model.rotary import rope
    from .model.mrope import mrope
    from .model.swiglu import silu_mul
    from .model.norm_linear import norm_linear
    from .model.moe_permute import moe_permute, moe_unpermute
    from .model.moe_gemm import grouped_linear, moe_sort
    from .sampling.sampler import SamplerWorkspace, sample, sample_triton
    from .invariant import exact

    __all__ = [
        "BACKENDS", "backend_for", "use_backend", "requested_backend", "triton_interpreting",
        "model_backend",
        "fused_for_model", "attention_backend", "flash_attn", "reference",
        "AGGS", "GROUP_ESTIMATORS", "IS_LEVELS", "IS_MODES", "SumOver", "aggregate",
        "aggregation_rule",
        "masked_mean",
        "masked_moments", "explained_variance", "importance_weights", "group_advantages",
        "token_logprobs", "linear_token_logprobs", "linear_distill_divergence", "DistillOutput",
        "kl_penalty", "gae", "masked_whiten",
        "ppo_policy_loss", "ppo_value_loss", "rms_norm", "rope", "mrope", "silu_mul", "norm_linear",
        "moe_sort", "moe_permute", "moe_unpermute", "grouped_linear",
        "store_kv", "rope_store_decode", "sample", "sample_triton", "SamplerWorkspace", "exact",
        "compile_ahead",
    ]
