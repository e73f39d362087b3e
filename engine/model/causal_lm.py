"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3; Qwen3-MoE and Mixtral, whose sparse
layers' MLP is moe.py's SparseMoeBlock) with one set of parameters and two uses:

- `forward_packed(input_ids, seqlens)`: the training forward over packed variable-length sequences,
  returning final hidden states [N, hidden] for `kernels.linear_token_logprobs(hidden,
  lm_head.weight, ...)`.
- `forward(input_ids, positions, meta, kv_caches)`: prefill or decode against the paged KV cache.

Both are one walk of the layers (`hidden_states`): the attention is what the caller passes (packed,
prefill or decode), every other op comes from a primitive set (primitives.py: FORWARD, DECODE or
EXACT, the batch-invariant mode's), and the whole walk runs on the one model backend kernels'
decider names for its tensors (`kernels.model_backend`). Four GEMMs per layer: q/k/v are one packed
projection (`self_attn.qkv_proj`) and gate/up another (`mlp.gate_up_proj`); parameter names are
otherwise the Hugging Face ones, and hf_io maps the packed row blocks to `q_proj`, `k_proj`, ... at
load and save. On the "torch" backend the ops follow transformers step for step (fp32 RMSNorm, RoPE
tables in fp32 cast to the activation dtype), which is what makes the fp32 parity tests tight. On
"triton" (CUDA), norms (with the residual add), RoPE of q and k and the MLP's SiLU * up are fused
kernels with their own backward (fusedrl.kernels), the same for decode, scoring and training: the
log-probs a rollout scores and the ones the update differentiates come from the same code, bit for
bit.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ... import kernels
from ..data.device_tensors import last_rows, packed_cu_seqlens, packed_positions
from ..data.prefix_sharing import share_prefixes
from .activation_offload import ActivationOffload
from ...kernels.attention import AttentionMetadata
from .attention import attention_step
from .config import ModelConfig
from .moe import SparseMoeBlock, agree_buffers, trace_restorer
from .primitives import FORWARD, past_hooks
from .rotary import RotaryAngles, RotaryTable

# (layer index, q [N, H, D], k [N, Hkv, D], v [N, Hkv, D] with q and k before RoPE, the forward's
# RotaryAngles) -> attention output [N, H, D]. An attend rotates q and k by `angles.rotate` first,
# unless its kernel does it (a fused decode step).
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "RotaryAngles"], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x, residual, prims: SimpleNamespace):
        """x [..., C] -> (RMSNorm(x + residual), x + residual); residual None: (RMSNorm(x), x)."""
        return prims.add_rms_norm(x, residual, self.weight, self.eps)


class Projection(nn.Linear):
    """A linear layer whose GEMM comes from the walk's primitive set."""

    def forward(self, x, prims: SimpleNamespace):
        """x [N, in] -> [N, out]."""
        return prims.linear(x, self.weight, self.bias)


class PackedProjection(Projection):
    """Several projections of one input as one GEMM (q/k/v, gate/up): the output holds each part's
    features in turn. `parts`: ((Hugging Face name, out features), ...), the names checkpoints give
    the row blocks of the weight and bias (hf_io maps them at load and save, by `row_blocks`).

    `tensor_parallel` T: the rows' layout. T = 1: every part whole, in turn. T > 1 (set by
    engine/parallel/tensor_parallel.py): rank-interleaved, tensor rank r's slice of every part in
    turn, then rank r + 1's, so that a contiguous 1/T of the rows (an FSDP2 Shard(0) shard) is one
    rank's q, k and v heads (its gate and up features), and the local GEMM's output splits like the
    whole one."""

    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], bias: bool, dtype):
        super().__init__(in_features, sum(size for _, size in parts), bias=bias, dtype=dtype)
        self.parts = parts
        self.tensor_parallel = 1

    def row_blocks(self) -> list[tuple[str, int, int, int]]:
        """(Hugging Face part name, packed row start, part row start, rows) of every block of rows,
        in packed order: one block per part when tensor_parallel is 1, T per part otherwise."""
        t = self.tensor_parallel
        blocks, packed = [], 0
        for rank in range(t):
            for name, size in self.parts:
                rows = size // t
                blocks.append((name, packed, rank * rows, rows))
                packed += rows
        return blocks

    def split(self, y):
        """y [..., out] (the whole output, or one tensor rank's [..., out / T]) -> one view per
        part, in order (that rank's slice of each part)."""
        shards = self.out_features // y.shape[-1]
        if shards != self.tensor_parallel:  # whole rank-interleaved rows do not split into parts
            raise ValueError(f"a projection output of {y.shape[-1]} features: expected "
                             f"{self.out_features // self.tensor_parallel} (its "
                             f"tensor_parallel={self.tensor_parallel} "
                             "layout runs only tensor-parallel)")
        return y.split([size // shards for _, size in self.parts], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, dtype):
        super().__init__()
        self.head_dim = c.head_dim
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv_proj = PackedProjection(c.hidden_size, (("q_proj", q_size), ("k_proj", kv_size),
                                                         ("v_proj", kv_size)), c.qkv_bias, dtype)
        self.o_proj = Projection(q_size, c.hidden_size, bias=c.o_bias, dtype=dtype)
        if c.qk_norm:  # Qwen3: RMSNorm over each head's q and k before RoPE
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)

    def forward(self, qkv, angles, attend, prims):
        """qkv [N, (H + 2 Hkv) D], the packed projection's output -> [N, hidden]; attend(q, k, v,
        angles) -> [N, H, D] is this layer's attention (RoPE included)."""
        n = qkv.shape[0]
        q, k, v = self.qkv_proj.split(qkv)  # strided views of one GEMM's rows
        # -1: all heads, or a tensor rank's share of them (its local shard's output)
        q, k, v = (t.view(n, -1, self.head_dim) for t in (q, k, v))
        if hasattr(self, "q_norm"):  # the norm kernel reads contiguous rows
            q, k = self.q_norm(q.contiguous(), None, prims)[0], self.k_norm(k.contiguous(), None,
                                                                            prims)[0]
        out = attend(q, k, v, angles)
        return self.o_proj(out.reshape(n, -1), prims)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, dtype):
        super().__init__()
        self.gate_up_proj = PackedProjection(c.hidden_size, (("gate_proj", c.intermediate_size),
                                                             ("up_proj", c.intermediate_size)),
                                             c.mlp_bias, dtype)
        self.down_proj = Projection(c.intermediate_size, c.hidden_size, bias=c.mlp_bias,
                                    dtype=dtype)



class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, dtype, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(c, dtype)
        sparse = c.moe is not None and layer_idx in c.moe.sparse_layers
        self.mlp = (SparseMoeBlock(c.moe, c.hidden_size, dtype, layer_idx) if sparse
                    else MLP(c, dtype))
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)

    def forward(self, x, residual, angles: "RotaryAngles", attend: Attend, prims):
        """(x, residual) -> (x, residual): the residual stream is summed inside the next norm, so
        the fused kernel does add + norm in one pass. residual is None before the first layer.
        Each norm and the projection after it are one primitive (`norm_linear`), which a decode
        step runs as one kernel, as it does SiLU * up after the gate/up projection."""
        qkv, residual = prims.norm_linear(x, residual, self.input_layernorm,
                                          self.self_attn.qkv_proj, prims)
        x = self.self_attn(qkv, angles, lambda q, k, v, a: attend(self.layer_idx, q, k, v, a),
                           prims)
        # the router and the experts read the normalized rows
        if isinstance(self.mlp, SparseMoeBlock):
            h, residual = self.post_attention_layernorm(x, residual, prims)
            return self.mlp(h, prims), residual
        h, residual = prims.norm_linear(x, residual, self.post_attention_layernorm,
                                        self.mlp.gate_up_proj, prims, glu=True)
        return self.mlp.down_proj(h, prims), residual


class DecoderBody(nn.Module):
    """The `model.` prefix of Hugging Face checkpoints."""

    def __init__(self, c: ModelConfig, dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype, i) for i in range(c.num_layers))
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
        # With checkpointing: the layers' saved inputs rest in CPU memory until the backward
        # (activation_offload.py); offloaded_bytes counts what the forwards moved there.
        self.activation_offload = False
        self.offloaded_bytes = 0
        # True while the modules hold weights that stay put, whole, in place of FSDP's shards (the
        # persistent gathered buffers: parallel/persistent_weights.py): the walk then enters the
        # root and the layers past FSDP's hooks, which would all-gather them.
        self.past_fsdp_hooks = False
        # The tensor group this model's weights are sliced over (engine/parallel/layout.py sets it:
        # a TensorParallel), whose primitives the walk runs on the local slices; None: whole
        # weights.
        self.tensor_parallel = None
        # The context group its training and scoring forwards shard their packs over (layout.py sets
        # it: an engine/parallel/context_parallel.ContextParallel); None: whole packs.
        self.context_parallel = None
        # Whether its FSDP2 shards rest in CPU memory (engine/parallel/distributed.shard's offload).
        self.offloaded = False

    @classmethod
    def variant_of(cls, model_cls: type) -> type:
        """The class that builds `model_cls` (CausalLM or a subclass with heads: the reward and
        value models) on a model of this one's kind: `model_cls` itself for a text model
        (VisionLanguageModel answers with its vision variant)."""
        return model_cls

    def set_recompute(self, checkpointing: bool, offload: bool = False):
        """train.gradient_checkpointing (each layer recomputed in backward) and, with it,
        train.activation_offload (the layers' saved inputs in CPU memory until the backward)."""
        if not isinstance(checkpointing, bool):
            raise TypeError(f"set_recompute: checkpointing={checkpointing!r}, expected a bool")
        if offload and not checkpointing:
            raise ValueError("activation offload moves what checkpointed layers keep: it needs "
                             "gradient checkpointing")
        self.gradient_checkpointing, self.activation_offload = checkpointing, offload

    def tie_weights(self):
        """Share the embedding with the LM head when the config says so (re-run after
        `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata | None = None, kv_caches=None,
                *, attend: Attend | None = None, prims: SimpleNamespace | None = None,
                visual=None):
        """input_ids, positions [N] ([3, N]: M-RoPE's) -> final hidden states [N, hidden].

        kv_caches: per layer (k_cache, v_cache) for prefill/decode, or None for a packed training
        batch. attend, prims: the walk's attention and primitive set given whole instead of built
        from `meta` (the batch-invariant mode; a decode step's `primitives.DECODE`); passed through
        here, not to `hidden_states`, so that FSDP's root hooks run (they initialize its state
        before any layer's). visual: a vision-language model's image features at their tokens
        (vision/rows.py's VisualRows), or None.
        """
        if attend is None:
            attend = attention_step(meta, kv_caches)
        if self.tensor_parallel is not None:
            prims = self.tensor_parallel.prims(prims or FORWARD)
        if self.past_fsdp_hooks:
            prims = past_hooks(prims or FORWARD)
        return self.hidden_states(input_ids, positions, attend, prims, visual)

    def entry(self) -> Callable:
        """What a step calls to run `forward`: the model itself, through FSDP's root hook (which
        gathers the root unit; tensor-parallel slices sharded over the data groups: from its data
        group), or past that hook its `forward`, where the walk reads persistent gathered buffers
        (past_fsdp_hooks)."""
        return self.forward if self.past_fsdp_hooks else self

    def hidden_states(self, input_ids, positions, attend: Attend,
                      prims: SimpleNamespace | None = None, visual=None):
        """The one walk of the decoder: input_ids, positions [N] -> final hidden states [N, hidden],
        attention from `attend` (what differs between packed, prefill and decode steps) and every
        other op from `prims` (default `primitives.FORWARD`), all on the model backend the decider
        names for the activations (asked once; a layer recomputed in backward runs on it too)."""
        prims = prims or FORWARD
        x = prims.embed(self.model.embed_tokens, input_ids)
        if visual is not None:  # image features in place of their placeholder tokens' embeddings
            x = visual.place(x)
        backend = kernels.model_backend(x)
        angles = RotaryAngles(self.rotary, positions, x.dtype, prims.rope)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        if self.config.moe is not None:  # fixed-capacity expert parallelism: one read a forward
            agree_buffers(self, x.shape[0], x.device)
        # A layer recomputed in backward routes as its forward did (a routing trace's replay) and
        # sizes its expert-parallel buffers as it did.
        routing = trace_restorer(self) if recompute else None
        residual = None
        offload = ActivationOffload() if recompute and self.activation_offload else None
        with kernels.use_backend(backend), offload.hooks() if offload else contextlib.nullcontext():
            for i, layer in enumerate(self.model.layers):
                args = (x, residual, angles, attend, prims)
                if recompute:
                    x, residual = checkpoint(prims.enter, layer, *args, use_reentrant=False,
                                             context_fn=lambda: (
                        contextlib.nullcontext(), _both(kernels.use_backend(backend), routing())))
                else:
                    x, residual = prims.enter(layer, *args)
                if visual is not None:  # Qwen3-VL's deepstack features after the first layers
                    x = visual.after_layer(i, x)
        if offload is not None:
            self.offloaded_bytes += offload.bytes_moved
        with kernels.use_backend(backend):
            return self.model.norm(x, residual, prims)[0]

    def check_input_ids(self, input_ids: torch.Tensor, name: str = "input_ids"):
        """Raise a one-line ValueError unless input_ids [N] are integer ids on the model's device:
        an entry point (a training or scoring forward) says what it expected instead of failing deep
        in an embedding lookup. Not moved silently: a copy per call is a hidden host-to-device
        sync."""
        weight = self.model.embed_tokens.weight
        if input_ids.device != weight.device or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} is {input_ids.dtype} on {input_ids.device}: expected int64 or int32 ids "
                "on "
                f"the model's device {weight.device}")

    def check_pack(self, input_ids, seqlens: list[int]) -> None:
        """A one-line ValueError unless input_ids [N] are ids on the model's device
        (check_input_ids) packed as sequences of `seqlens`: positive lengths summing to N, none
        past max_model_len."""
        self.check_input_ids(input_ids)
        if not seqlens or sum(seqlens) != input_ids.shape[0] or min(seqlens) < 1:
            raise ValueError(
                f"seqlens must be positive and sum to {input_ids.shape[0]}, got {seqlens}")
        if max(seqlens) > self.config.max_model_len:
            raise ValueError(f"a sequence of {max(seqlens)} tokens exceeds max_model_len "
                             f"{self.config.max_model_len}")

    def forward_packed(self, input_ids, seqlens: list[int], positions=None, cu_seqlens=None,
                       visual=None):
        """Training forward over packed sequences: input_ids [N] (sum(seqlens) == N) on the model's
        device -> hidden [N, hidden].

        Positions restart at 0 for each sequence and no token attends across sequences. positions
        [N] int64 and cu_seqlens [S + 1] int32, when given (a PackedBatch's, built once per pack),
        spare rebuilding them for every forward over the same pack. visual: as forward's.
        """
        self.check_pack(input_ids, seqlens)
        for name, given, shape in (("positions", positions, self.position_shape(input_ids)),
                                   ("cu_seqlens", cu_seqlens, (len(seqlens) + 1,))):
            if (given is not None
                and (tuple(given.shape) != shape or given.device != input_ids.device)):
                raise ValueError(
                    f"{name} is {tuple(given.shape)} on {given.device}: expected {shape} on "
                    f"{input_ids.device}")
        # Made on the host and sent without a blocking copy (device_tensors.py)
        if cu_seqlens is None:
            cu_seqlens = packed_cu_seqlens(seqlens, input_ids.device)
        if positions is None:
            positions = packed_positions(seqlens, input_ids.device)
        meta = AttentionMetadata.packed(seqlens, input_ids.device, cu_seqlens)
        return self.entry()(input_ids, positions, meta, visual=visual)

    def position_shape(self, input_ids) -> tuple[int, ...]:
        """The shape of a training forward's positions for input_ids [N]: [N]."""
        return (input_ids.shape[0],)

    def forward_rows(self, packed, layout=None):
        """Hidden states of a PackedBatch's rows: (hidden [N', hidden], rows [M] of it predicting
        the pack's targets, rows [S] holding each sequence's last token).

        With packed.prefix_groups, the rows of a group read their prompt once (N' < N; layout:
        engine/data/prefix_sharing.py's share_prefixes(packed), built here when not given);
        without, forward_packed over the pack as it is (N' = N).
        """
        layout = layout or share_prefixes(packed)
        if layout is None:
            hidden = self.forward_packed(packed.input_ids, packed.seqlens, packed.positions,
                                         packed.cu_seqlens)
            last = last_rows(packed.seqlens, hidden.device)
            return hidden, packed.target_rows, last
        self.check_input_ids(packed.input_ids)
        ids, positions = (t.index_select(0, layout.token_index)
                          for t in (packed.input_ids, packed.positions))
        return self.forward_shared(ids, positions, layout)

    def forward_shared(self, ids, positions, layout, visual=None):
        """The forward over a shared layout's token stream: ids [N'] and positions [N'] (M-RoPE's:
        [3, N']), each token's from its row, in stream order (layout.token_index's) -> (hidden
        [N', hidden], rows [M] predicting the pack's targets, rows [S] of each row's last token);
        visual: image features at the stream's placeholder tokens, as forward's."""
        if max(layout.seqlens_k) > self.config.max_model_len:
            raise ValueError(f"a sequence of {max(layout.seqlens_k)} tokens exceeds max_model_len "
                             f"{self.config.max_model_len}")
        hidden = self.entry()(ids, positions, AttentionMetadata.shared(layout), visual=visual)
        return hidden, layout.target_rows, layout.last_rows

    def compute_logits(self, hidden):
        """hidden [N, hidden] -> fp32 logits [N, vocab]."""
        return self.lm_head(hidden).float()


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def rebuild_as(model_cls: type, like: CausalLM, state: dict, strict: bool = True) -> CausalLM:
    """A `model_cls` (CausalLM or a subclass with extra heads; its vision variant when `like` is a
    vision-language model) with `like`'s config, dtype and device, filled from `state`: built on
    the meta device, so no random init is paid for.

    Returns the model; with strict=False, the missing and unexpected keys are in
    `model.load_report` for the caller to judge (e.g. a new head that starts at zero)."""
    param = next(like.parameters())
    with torch.device("meta"):
        model = type(like).variant_of(model_cls)(like.config, param.dtype)
    model.to_empty(device=param.device)
    model.tie_weights()
    model.load_report = model.load_state_dict(state, strict=strict)
    model.gradient_checkpointing = like.gradient_checkpointing
    model.activation_offload = like.activation_offload
    return model
