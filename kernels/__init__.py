"""fusedrl.kernels: fused RLHF ops (Triton) with plain PyTorch references.

Every op validates its inputs, then runs on the backend chosen by ``fusedrl.kernels.dispatch``:
Triton for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), the PyTorch reference
otherwise; ``use_backend(...)`` and ``FUSEDRL_BACKEND`` override, including "cuda": the optional
compiled kernels of csrc/ (``fusedrl.kernels.cuda_ext``, see BACKENDS.md). The ops are registered as
torch custom ops (namespace ``fusedrl``), so torch.compile traces through them. Without triton
installed the package still imports and every op runs on the torch backend.
"""
if __name__ != "fusedrl.kernels":
    # The repository root is on sys.path and this folder was imported as `kernels`: see shadowed.py.
    from .shadowed import stand_aside
    stand_aside(__name__, __file__)
else:
    from . import reference
    from .aggregation import aggregation_rule
    from .dispatch import BACKENDS, backend_for, use_backend
    from .advantages import gae
    from .whiten import masked_whiten
    from .group_advantages import group_advantages
    from .kl import kl_penalty
    from .linear_logprobs import linear_token_logprobs
    from .ppo_loss import ppo_policy_loss, ppo_value_loss
    from .logprobs import token_logprobs
    from .norm import rms_norm
    from .rotary import rope
    from .sampling import SamplerWorkspace, sample
    from .swiglu import silu_mul

    __all__ = [
        "BACKENDS", "backend_for", "use_backend", "reference", "aggregation_rule",
        "token_logprobs", "linear_token_logprobs", "kl_penalty", "gae", "masked_whiten", "group_advantages",
        "ppo_policy_loss", "ppo_value_loss", "rms_norm", "rope", "silu_mul", "sample", "SamplerWorkspace",
    ]
