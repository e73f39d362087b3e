"""Activation bytes per token of one decoder, from its shapes, for the engine's forwards.

Training (autograd keeps, per layer and token, in the weights' dtype): the two norms' input sums and
outputs (4 H, what the fused add + RMSNorm and the GEMM after it read back), the packed q/k/v
projection (q + 2 kv), the rotated q and k (q + kv), the attention output (q), the gate/up output
(2 I, for SiLU * up's backward) and its product (I, for down_proj's): 4 H + 3 q + 3 kv + 3 I. With
train.gradient_checkpointing a layer keeps its input and residual (2 H) and one layer at a time is
recomputed in full. An MoE layer's MLP keeps instead, per token, its router logits and
probabilities (2 E), the k permuted input rows and the k expert outputs the weighted unpermute
reads back (2 k H), and the k rows' gate/up and product (3 k I, I the expert's). Backward adds a layer's activation gradients (2 I + 2 H). A no-grad forward
(scoring, prefill) holds one layer's largest moment: the residual stream (2 H), the norm's output
(H) and the MLP's gate/up and product (3 I), or the attention's q/k/v, rotated q/k and output.
The LM head never holds [tokens, vocab] logits (kernels/linear_logprobs.py): a chunk of at most
LOGIT_CHUNK elements and its gradient (`lm_head`: the forward ends in the LM head's log-probs; the
reward and value models end in a scalar head instead).
"""
from __future__ import annotations

from ..model.config import ModelConfig

LOGIT_CHUNK = 1 << 27  # kernels/linear_logprobs.py: CHUNK_ELEMENTS, elements of logits in one chunk


def _widths(c: ModelConfig) -> tuple[int, int, int, int]:
    return c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size


def _mlp_saved(c: ModelConfig, sparse: bool) -> int:
    if not sparse:
        return 3 * c.intermediate_size
    m = c.moe
    return 2 * m.num_experts + 2 * m.top_k * c.hidden_size + 3 * m.top_k * m.intermediate_size


def saved_per_layer(c: ModelConfig, sparse: bool = False) -> int:
    """Elements autograd keeps per token for one decoder layer (sparse: an MoE layer)."""
    h, q, kv, _ = _widths(c)
    return 4 * h + 3 * q + 3 * kv + _mlp_saved(c, sparse)


def training_bytes_per_token(c: ModelConfig, elem: int, checkpointing: bool) -> int:
    """Peak activation bytes per token of a training forward + backward."""
    h, _, _, i = _widths(c)
    sparse = set(c.moe.sparse_layers) if c.moe is not None else set()
    per_layer = [saved_per_layer(c, layer in sparse) for layer in range(c.num_layers)]
    kept = 2 * h * c.num_layers if checkpointing else sum(per_layer)
    recomputed = max(per_layer) if checkpointing else 0
    return elem * (kept + recomputed + 2 * i + 2 * h)


def forward_bytes_per_token(c: ModelConfig, elem: int) -> int:
    """Peak activation bytes per token of a no-grad forward (one layer's live tensors)."""
    h, q, kv, i = _widths(c)
    return elem * (3 * h + max(3 * i, 3 * q + 3 * kv))


def lm_head_bytes(c: ModelConfig, elem: int, tokens: int) -> int:
    """The LM head's logits chunk and its gradient: at most LOGIT_CHUNK elements each."""
    return 2 * elem * min(LOGIT_CHUNK, tokens * c.vocab_size)


def training_activations(c: ModelConfig, elem: int, checkpointing: bool, tokens: int, lm_head: bool) -> int:
    return tokens * training_bytes_per_token(c, elem, checkpointing) + (lm_head_bytes(c, elem, tokens) if lm_head else 0)


def forward_activations(c: ModelConfig, elem: int, tokens: int, lm_head: bool) -> int:
    return tokens * forward_bytes_per_token(c, elem) + (lm_head_bytes(c, elem, tokens) if lm_head else 0)
