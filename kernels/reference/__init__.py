"""Plain PyTorch references for every fused op, each named as its op (``reference.<op>``): the
oracle the kernels are tested against, the "torch" backend, and the eager baseline in the
benchmarks.

Written for clarity, not speed: each is the textbook composition, differentiated by autograd. The RL
ops' references are rl.py's; the masked statistics and the loss aggregation statistics.py's (the
ops build on them too); the model-scale ops' (model.py:
transformers' compositions), the mixture-of-experts permutation's (moe.py) and the sampler's
(sampling.py) are re-exported here too.
"""
from .distill import linear_distill_divergence
from .model import (mrope, norm_linear, paged_decode, rms_norm, rope, rope_store_decode, silu_mul,
                    store_kv)
from .moe import grouped_linear, moe_permute, moe_unpermute
from .rl import (gae, kl_penalty, linear_token_logprobs, policy_terms, ppo_policy_loss,
                 ppo_value_loss, token_logprobs, value_terms)
from .sampling import sample
from .statistics import (aggregate, compute_dtype, masked_mean, masked_moments, masked_whiten,
                         valid_entries, weighted_sum)

__all__ = [
    "token_logprobs", "linear_token_logprobs", "kl_penalty", "gae", "masked_mean", "masked_moments",
    "masked_whiten", "weighted_sum", "aggregate", "policy_terms", "ppo_policy_loss", "value_terms",
    "ppo_value_loss", "rms_norm", "silu_mul", "rope", "mrope", "norm_linear", "store_kv",
    "paged_decode", "rope_store_decode", "sample", "linear_distill_divergence", "moe_permute",
    "moe_unpermute", "grouped_linear",
]
