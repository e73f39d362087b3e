"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) with one set of parameters and two uses:

- `forward_packed(input_ids, seqlens)`: the training forward over packed variable-length sequences,
  returning final hidden states [N, hidden] for `kernels.linear_token_logprobs(hidden, lm_head.weight, ...)`.
- `forward(input_ids, positions, meta, kv_caches)`: prefill or decode against the paged KV cache.

Parameter names are the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`, ...), so
checkpoints map one to one. The PyTorch path follows transformers step for step (fp32 RMSNorm, RoPE
tables in fp32 cast to the activation dtype), which is what makes the fp32 parity tests tight. Where
the engine runs Triton (CUDA; see attention.use_triton), norms (with the residual add), RoPE of q and
k and the MLP's SiLU * up are fused kernels with their own backward (fusedrl.kernels), the same for
decode, scoring and training: the log-probs a rollout scores and the ones the update differentiates
come from the same code, bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import (AttentionMetadata, decode_attention, prefill_attention, store_kv,
                              use_triton, varlen_attention)
from .config import ModelConfig
from ...kernels.norm import rms_norm, rms_norm_reference
from ...kernels.rotary import rope, rope_reference
from ...kernels.swiglu import silu_mul, silu_mul_reference


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x, residual=None):
        """x [..., C] -> RMSNorm(x). With `residual`: (RMSNorm(x + residual), x + residual)."""
        norm = rms_norm if use_triton(x) else rms_norm_reference
        return norm(x, self.weight, self.eps, residual)


def apply_rope(q, k, cos, sin):
    """q [N, H, D], k [N, Hkv, D]; cos/sin [N, D] in their dtype -> rotated (q, k)."""
    if use_triton(q):
        return rope(q, k, cos, sin)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)


class RotaryTable:
    """cos/sin [L, D] of every position below max_model_len, computed in fp32 as transformers does,
    kept out of the module's buffers so that `model.to(bfloat16)` cannot round the angles. Per
    (device, dtype) a cast copy is cached, so a step costs one gather for each of cos and sin."""

    def __init__(self, config: ModelConfig):
        # Built on the CPU explicitly: the model itself may be constructed under a meta device.
        positions = torch.arange(config.max_model_len, dtype=torch.int64, device="cpu").float()
        freqs = positions[:, None] * config.inv_freq().to("cpu")[None, :]  # [L, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]
        self.cos, self.sin = emb.cos(), emb.sin()
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, positions, dtype):
        """positions [N] -> (cos, sin) [N, D] in `dtype`."""
        key = (positions.device, dtype)
        if key not in self._cast:
            self._cast[key] = (self.cos.to(positions.device, dtype), self.sin.to(positions.device, dtype))
        cos, sin = self._cast[key]
        return cos[positions], sin[positions]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype)
        if c.qk_norm:  # Qwen3: RMSNorm over each head's q and k before RoPE
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache=None):
        """x [N, hidden] -> [N, hidden]. kv_cache: (k_cache, v_cache) of this layer or None."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, cos, sin)
        if kv_cache is None:
            out = varlen_attention(q, k, v, meta)
        else:
            store_kv(k, v, *kv_cache, meta.slot_mapping)
            if meta.is_decode:
                out = decode_attention(q, *kv_cache, meta)
            else:
                out = prefill_attention(q, k, v, *kv_cache, meta)
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, dtype=dtype)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj((silu_mul if use_triton(x) else silu_mul_reference)(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, dtype):
        super().__init__()
        self.self_attn = Attention(c, dtype)
        self.mlp = MLP(c, dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)

    def forward(self, x, residual, cos, sin, meta, kv_cache=None):
        """(x, residual) -> (x, residual): the residual stream is summed inside the next norm, so
        the fused kernel does add + norm in one pass. residual is None before the first layer."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderBody(nn.Module):
    """The `model.` prefix of Hugging Face checkpoints."""

    def __init__(self, c: ModelConfig, dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)


class CausalLM(nn.Module):
    """Decoder + LM head. Build with `engine.checkpoint.load_model`, which fills the weights."""

    def __init__(self, config: ModelConfig, dtype=torch.float32):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.tie_weights()
        self.rotary = RotaryTable(config)
        # Trainers set this to recompute each layer in backward (activation memory of one layer).
        self.gradient_checkpointing = False

    def tie_weights(self):
        """Share the embedding with the LM head when the config says so (re-run after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches=None):
        """input_ids, positions [N] -> final hidden states [N, hidden].

        kv_caches: per layer (k_cache, v_cache) for prefill/decode, or None for a packed training batch.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        recompute = self.gradient_checkpointing and kv_caches is None and torch.is_grad_enabled()
        residual = None
        for i, layer in enumerate(self.model.layers):
            if recompute:
                x, residual = checkpoint(layer, x, residual, cos, sin, meta, use_reentrant=False)
            else:
                x, residual = layer(x, residual, cos, sin, meta, None if kv_caches is None else kv_caches[i])
        return self.model.norm(x, residual)[0]

    def check_input_ids(self, input_ids: torch.Tensor, name: str = "input_ids"):
        """Raise a one-line ValueError unless input_ids [N] are integer ids on the model's device: an
        entry point (a training or scoring forward) says what it expected instead of failing deep in
        an embedding lookup. Not moved silently: a copy per call is a hidden host-to-device sync."""
        weight = self.model.embed_tokens.weight
        if input_ids.device != weight.device or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} is {input_ids.dtype} on {input_ids.device}: expected int64 or int32 ids on "
                             f"the model's device {weight.device}")

    def forward_packed(self, input_ids, seqlens: list[int]):
        """Training forward over packed sequences: input_ids [N] (sum(seqlens) == N) on the model's
        device -> hidden [N, hidden].

        Positions restart at 0 for each sequence and no token attends across sequences.
        """
        self.check_input_ids(input_ids)
        if sum(seqlens) != input_ids.shape[0] or min(seqlens) < 1:
            raise ValueError(f"seqlens must be positive and sum to {input_ids.shape[0]}, got {seqlens}")
        if max(seqlens) > self.config.max_model_len:
            raise ValueError(f"a sequence of {max(seqlens)} tokens exceeds max_model_len "
                             f"{self.config.max_model_len}")
        meta = AttentionMetadata.packed(seqlens, input_ids.device)
        starts = meta.cu_seqlens_q[:-1].long().repeat_interleave(  # [N] start of each token's sequence
            torch.tensor(seqlens, device=input_ids.device), output_size=input_ids.shape[0])
        positions = torch.arange(input_ids.shape[0], device=input_ids.device) - starts
        return self(input_ids, positions, meta)

    def compute_logits(self, hidden):
        """hidden [N, hidden] -> fp32 logits [N, vocab]."""
        return self.lm_head(hidden).float()


def rebuild_as(model_cls: type, like: CausalLM, state: dict, strict: bool = True) -> CausalLM:
    """A `model_cls` (CausalLM or a subclass with extra heads) with `like`'s config, dtype and
    device, filled from `state`: built on the meta device, so no random init is paid for.

    Returns the model; with strict=False, the missing and unexpected keys are in
    `model.load_report` for the caller to judge (e.g. a new head that starts at zero)."""
    param = next(like.parameters())
    with torch.device("meta"):
        model = model_cls(like.config, param.dtype)
    model.to_empty(device=param.device)
    model.tie_weights()
    model.load_report = model.load_state_dict(state, strict=strict)
    model.gradient_checkpointing = like.gradient_checkpointing
    return model
