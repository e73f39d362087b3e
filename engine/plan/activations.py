"""Activation bytes per token of one decoder, from its shapes, for the engine's forwards.

Training (autograd keeps, per layer and token, in the weights' dtype): the two norms' input sums and
outputs (4 H, what the fused add + RMSNorm and the GEMM after it read back), the packed q/k/v
projection (q + 2 kv), the rotated q and k (q + kv), the attention output (q), the gate/up output
(2 I, for SiLU * up's backward) and its product (I, for down_proj's): 4 H + 3 q + 3 kv + 3 I. With
train.gradient_checkpointing a layer keeps its input and residual (2 H) and one layer at a time is
recomputed in full. An MoE layer's MLP keeps instead, per token, its router logits and
probabilities (2 E), the k permuted input rows and the k expert outputs the weighted unpermute
reads back (2 k H), and the k rows' gate/up and product (3 k I, I the expert's). Backward adds a
layer's activation gradients (2 I + 2 H); the LM head's moment comes before it, not with it (the
peak is the larger of the two). Measured on the CPU (tests/engine/plan/test_activations_measured.py:
the fused kernels' path within 10%, the torch path's growth per token within 25%). A no-grad forward
(scoring, prefill) holds one layer's largest moment: the residual stream (2 H), the norm's output
(H) and the MLP's gate/up and product (3 I), or the attention's q/k/v, rotated q/k and output.
The LM head never holds [tokens, vocab] logits (kernels/rl/linear_logprobs.py): a chunk of at most
LOGIT_CHUNK elements and its gradient (`lm_head`: the forward ends in the LM head's log-probs; the
reward and value models end in a scalar head instead).
"""
from __future__ import annotations

from ..model.config import ModelConfig

# At least the logits in one chunk (kernels/rl/linear_logprobs.py: CHUNK_BYTES of them)
LOGIT_CHUNK = 1 << 27
# LLM's default prefill budget (max_num_batched_tokens, engine/inference/llm.py): a step's prompts
# hold at most this many tokens, bar one longer sequence alone (rollout.prefill_chunk cuts it).
PREFILL_TOKENS = 16384


def rollout_prefill_tokens(r, max_model_len: int) -> int:
    """Tokens of the rollout's largest prefill forward (r: a RolloutConfig): the engine's batch
    (r.max_rows; partial rollouts prefill a carried answer again) within the prefill budget, or a
    lone sequence up to max_model_len (a prefill_chunk where set)."""
    alone = min(r.prefill_chunk or max_model_len, max_model_len)
    prefilled = r.max_rows * (r.max_prompt_length + (r.max_new_tokens if r.partial_rollouts else 0))
    return min(max(PREFILL_TOKENS, alone), prefilled)


def vision_activations(c: ModelConfig, elem: int, tokens: int, trained: bool) -> int:
    """Peak activation bytes of a vision-language model's tower in a forward over `tokens` tokens
    (0 for a text model), bounded as if every token were an image token (merge**2 patches each):
    trained (train.train_vision), autograd keeps per patch and block what a decoder layer keeps
    (saved_per_layer at the tower's widths, attention q = k = v = its hidden size) and the merger's
    input; frozen, no graph is built and one block's moment is held (forward_bytes_per_token's).
    The tower's output rows are decoder inputs, counted with the decoder."""
    if c.vision is None or not tokens:
        return 0
    v = c.hf_config.vision_config
    h, i = v.hidden_size, v.intermediate_size
    patches = tokens * c.vision.spatial_merge_size ** 2
    if trained:
        per_patch = v.depth * (4 * h + 6 * h + 3 * i) + h
    else:
        per_patch = 8 * h + 3 * h + 3 * i
    return int(patches * elem * per_patch)


def _widths(c: ModelConfig) -> tuple[int, int, int, int]:
    return c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size


def _mlp_saved(c: ModelConfig, sparse: bool) -> int:
    if not sparse:
        return 3 * c.intermediate_size
    m = c.moe
    return 2 * m.num_experts + 2 * m.top_k * c.hidden_size + 3 * m.top_k * m.intermediate_size


def saved_per_layer(c: ModelConfig, sparse: bool = False, shared_keys: float = 0.0,
                    fused: bool = True) -> float:
    """Elements autograd keeps per token for one decoder layer (sparse: an MoE layer). shared_keys:
    with prefix sharing, the keys and values attention gathers per forwarded token (a shared
    prompt's keys once per answer: SharedLayout.key_rows), kept for its backward. fused False:
    the torch ops of the CPU path, whose two norms also keep their normalized rows (2 H) and whose
    RoPE keeps the rotate_half copies of q and k (q + kv)."""
    h, q, kv, _ = _widths(c)
    unfused = 0 if fused else 2 * h + q + kv
    return 4 * h + 3 * q + 3 * kv + _mlp_saved(c, sparse) + 2 * kv * shared_keys + unfused


def training_activations(c: ModelConfig, elem: int, checkpointing: bool, tokens: int,
                         lm_head: bool, *, offload: bool = False, shared_keys: float = 0.0,
                         fused: bool = True) -> int:
    """Peak activation bytes of a training forward + backward over `tokens` forwarded tokens: what
    the layers keep until their backward, plus the larger of the two moments that do not overlap,
    the LM head's (its logits chunk and gradient, before any layer's backward runs) and a layer's
    backward (with checkpointing its recomputed tensors) with its activation gradients. offload
    (train.activation_offload, with checkpointing): the kept layer inputs rest in CPU memory but
    for the layer being recomputed and the one prefetched."""
    h, _, _, i = _widths(c)
    sparse = set(c.moe.sparse_layers) if c.moe is not None else set()
    per_layer = [saved_per_layer(c, layer in sparse, shared_keys, fused)
                 for layer in range(c.num_layers)]
    if checkpointing:
        kept, backward = 2 * h * (min(2, c.num_layers) if offload else c.num_layers), max(per_layer)
    else:
        kept, backward = sum(per_layer), 0
    layer_backward = tokens * elem * (backward + 2 * i + 2 * h)
    head = lm_head_bytes(c, elem, tokens) if lm_head else 0
    return int(tokens * elem * kept + max(layer_backward, head))


def forward_bytes_per_token(c: ModelConfig, elem: int, shared_keys: float = 0.0) -> float:
    """Peak activation bytes per token of a no-grad forward: a layer's MLP moment, while the layer's
    input and residual, its residual sums, norm outputs and attention output are still referenced
    (8 H, as measured), with its packed q/k/v (q + 2 kv), the gate/up output and product (3 I), and
    with prefix sharing the gathered keys and values (2 kv per gathered key)."""
    h, q, kv, i = _widths(c)
    return elem * (8 * h + q + 2 * kv + 3 * i + 2 * kv * shared_keys)


def lm_head_bytes(c: ModelConfig, elem: int, tokens: int) -> int:
    """The LM head's logits chunk and its gradient: at most LOGIT_CHUNK elements each."""
    return 2 * elem * min(LOGIT_CHUNK, tokens * c.vocab_size)


def forward_activations(c: ModelConfig, elem: int, tokens: int, lm_head: bool,
                        shared_keys: float = 0.0) -> int:
    """Peak activation bytes of a no-grad forward over `tokens` forwarded tokens: the larger of a
    layer's moment and the LM head's chunk (the same on the fused and the torch path, as
    measured)."""
    head = lm_head_bytes(c, elem, tokens) if lm_head else 0
    return max(int(tokens * forward_bytes_per_token(c, elem, shared_keys)), head)


def context_share(context_parallel: int, tokens: int, shared_keys: float = 0.0) -> tuple[int,
                                                                                         float]:
    """(tokens, keys gathered per token) a GPU forwards of a forward over `tokens` tokens: at
    train.context_parallel C > 1 its 1/C of them (rounded up), attention reading the keys and values
    of the whole pack gathered over the context group (engine/parallel/context_parallel.py), up to C
    per forwarded token (prefix sharing, which gathers keys too, is refused beside it)."""
    c = context_parallel
    return (tokens, shared_keys) if c == 1 else (-(-tokens // c), float(c))


def shared_prefix_tokens(rows: int, group: int, prompt: int, answer: int,
                         sharing: bool) -> tuple[int, float]:
    """(tokens a forward over `rows` rows of `prompt` + `answer` tokens reads, keys gathered per
    forwarded token) with train.prefix_sharing and groups of `group` rows (a prompt read once per
    group); (rows x the row, 0) without."""
    if not sharing or group < 2:
        return rows * (prompt + answer), 0.0
    forwarded = rows // group * (prompt + group * answer) + rows % group * (prompt + answer)
    return forwarded, rows * (prompt + answer) / forwarded
