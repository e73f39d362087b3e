"""The representative workload whose Triton launches the static check compiles.

Every public op at the headline shapes (vocabularies 151936 / 128256 / 50257, bf16 and fp32, with
and without entropy, forward and backward); `LLM.generate` on 1-layer models with the attention
shapes of Qwen2.5-0.5B, Qwen3-0.6B and Llama-3-8B; the decode GEMMs at Qwen2.5-7B's and
Qwen3-30B-A3B's hidden sizes and their paged decode at the split counts an H100 takes at long
contexts; the launch shapes bench/tune_decode.py times at Qwen2.5-0.5B's decode (so that a visit
finds them in the prebuilt cache); the bench's engine as it starts (every graph size's decode step
at Qwen2.5-0.5B's shape: a visit's first row); the MoE grouped GEMM with 128
experts; a training forward and backward. Rows are few
(the interpreter runs them on the CPU): what decides specialization and block sizes is the row
length, the dtypes and the strides, which are the real ones.
"""
from __future__ import annotations

from unittest import mock

import torch

from fusedrl import kernels
from fusedrl.engine.inference.llm import LLM
from fusedrl.kernels.model.grouped_gemm import grouped_gemm
from fusedrl.kernels.attention.paged import decode_splits, rope_store_decode_triton
from fusedrl.kernels.sampling.sampler import sample_triton
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.config import ModelConfig
from fusedrl.engine.model.invariant import BatchInvariant
from fusedrl.kernels.invariant.segment_attention import segment_attention
from fusedrl.kernels.invariant.row_logprobs import row_logprobs
from fusedrl.kernels.invariant.fixed_tile_matmul import linear_fixed_tiles
from fusedrl.kernels.model.norm_linear import launch as norm_linear_launch, norm_linear
from fusedrl.bench import tune_decode
from fusedrl.bench.shapes import qwen_like
from fusedrl.engine.inference.decode_graphs import DecodeGraphs
from fusedrl.kernels.attention import paged

from value_checks import value_checks_as_on_gpu
from .record import unexecuted

VOCABS = (151936, 128256, 50257)
DTYPES = (torch.bfloat16, torch.float32)
# (name, hidden, heads, kv heads, head dim, qk norm): the attention shapes that pick the kernels'
# blocks. Intermediate size and vocabulary are cut down: they only size matmuls.
MODELS = (("Qwen2.5-0.5B", 896, 14, 2, 64, False), ("Qwen3-0.6B", 1024, 16, 8, 128, True),
          ("Llama-3-8B", 4096, 32, 8, 128, False))
# The large decode shapes (name, hidden, heads, kv heads, head dim, qk norm, MLP width): the fused
# norm + q/k/v and norm + gate/up GEMMs at their hidden size (`large_decode_gemms`) and the paged
# decode at their attention shape (`decode_splits_at_long_context`). Qwen3-30B-A3B's experts run as
# grouped GEMMs (`moe_gemms`): its MLP width here is the expert width.
LARGE_MODELS = (("Qwen2.5-7B", 3584, 28, 4, 128, False, 18944),
                ("Qwen3-30B-A3B", 2048, 32, 4, 128, True, 768))
# An H100's SMs: decode_splits' choice there for batch 1 and 32 at 4k and 32k tokens of context.
GPU_SMS = 132
# The bench's engine (bench/suites/generate.py's): graphs up to the mixed workload's 256 rows, the
# checkpoint's context (Qwen2.5-0.5B's 32,768 tokens: tables of 2,048 pages of 16).
GRAPH_ROWS, GRAPH_CONTEXT = 256, 32768
TOKENS = 64  # per-token streams: a multiple of 16, as real batches are
STEPS = 1024  # GAE's time steps: a full block of the scan


def ops(vocabs=VOCABS) -> None:
    """Each public op forward and backward, on every dtype and vocabulary."""
    for dtype in DTYPES:
        for vocab in vocabs:
            for entropy in (False, True):
                logits = torch.randn(2, vocab, dtype=dtype, requires_grad=True)
                out = kernels.token_logprobs(logits, torch.randint(0, vocab, (2,)), return_entropy=entropy)
                (sum(out) if entropy else out).sum().backward()
        x = torch.randn(TOKENS, dtype=dtype, requires_grad=True)
        ref, mask = torch.randn(TOKENS, dtype=dtype), torch.rand(2, TOKENS // 2) > 0.2
        for estimator in ("k1", "k3"):
            kernels.kl_penalty(x, ref, estimator=estimator, mask=mask.flatten()).sum().backward()
        rows = x.view(2, TOKENS // 2)
        kernels.gae(torch.randn(2, STEPS, dtype=dtype), torch.randn(2, STEPS, dtype=dtype),
                    torch.rand(2, STEPS) > 0.2)
        kernels.kl_penalty(x, ref, estimator="k3", clamp=10.0, log_ratio_clamp=20.0).sum().backward()
        kernels.masked_whiten(torch.randn(2, STEPS, dtype=dtype), torch.rand(2, STEPS) > 0.2)
        for mode in ({}, dict(dual_clip=3.0), dict(ratio_level="sequence", is_mode="tis", is_level="sequence"),
                     dict(is_mode="mis")):
            kernels.ppo_policy_loss(rows, ref.view(2, -1), ref.view(2, -1), mask, rollout_logprobs=ref.view(2, -1),
                                    **mode)[0].backward()
        kernels.ppo_value_loss(rows, ref.view(2, -1), ref.view(2, -1), mask)[0].backward()
    hidden = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(VOCABS[-1], 64, dtype=torch.bfloat16, requires_grad=True)
    kernels.linear_token_logprobs(hidden, weight, torch.randint(0, VOCABS[-1], (4,)),
                                  fuse_matmul=False).sum().backward()


def fp32_gemms() -> None:
    """The GEMM kernels' fp32 launches, which multiply in full fp32 (no tensor cores): decode's
    norm + q/k/v projection and norm + gate/up with SiLU * up at Qwen2.5-0.5B's widths (4 rows), and
    the LM head's fused forward and backward (129 rows)."""
    x, residual, norm_weight = torch.randn(4, 896), torch.randn(4, 896), torch.ones(896)
    norm_linear(x, residual, norm_weight, 1e-6, torch.randn(1152, 896) / 30, torch.randn(1152), False)
    norm_linear(x, residual, norm_weight, 1e-6, torch.randn(2 * 256, 896) / 30, None, True)
    hidden = torch.randn(129, 896, requires_grad=True)
    weight = (torch.randn(4096, 896) / 30).requires_grad_()
    kernels.linear_token_logprobs(hidden, weight, torch.randint(0, 4096, (129,)), fuse_matmul=True).sum().backward()


def lm_head(quick: bool = False) -> None:
    """linear_token_logprobs' fused GEMMs at Qwen2.5-0.5B's hidden size (the GEMMs' K, a constexpr)
    in bf16, at both row tiles (4 rows: 64; 129 rows: 128), with and without entropy, forward and
    backward (`quick`: each tile with one of the two). The vocabulary is cut to 4096: it is a
    runtime bound, and it only sizes the grids."""
    for rows in (4, 129):
        for entropy in ((rows > 64,) if quick else (False, True)):
            hidden = torch.randn(rows, 896, dtype=torch.bfloat16, requires_grad=True)
            weight = (torch.randn(4096, 896) / 30).to(torch.bfloat16).requires_grad_()
            out = kernels.linear_token_logprobs(hidden, weight, torch.randint(0, 4096, (rows,)),
                                                return_entropy=entropy)
            (sum(out) if entropy else out).sum().backward()


def invariant_matmul() -> None:
    """The batch-invariant mode's fixed-tile matmul at Qwen2.5-0.5B's projection widths (few rows:
    the tiles are fixed whatever the row count), with and without bias, into fp32 logits, and its
    K split in pieces (the MLP's 4864-wide down projection)."""
    for dtype in DTYPES:
        x, wide = torch.randn(5, 896, dtype=dtype), torch.randn(5, 4864, dtype=dtype)
        linear_fixed_tiles(x, torch.randn(128, 896, dtype=dtype), torch.randn(128, dtype=dtype))
        linear_fixed_tiles(wide, torch.randn(64, 4864, dtype=dtype))
        linear_fixed_tiles(x, torch.randn(64, 896, dtype=dtype), out_dtype=torch.float32)


# Llama-3-8B's attention compiles as Qwen3's (group pad 16, head dim 128): the first two shapes suffice.
def invariant_mode(models=MODELS[:2]) -> None:
    """The batch-invariant mode's own kernels at each model's attention shape, bf16 and fp32: the
    segment attention (two queries, 21 and 6 keys, 16-token pages, the engine's default segment) and
    its merge, and the per-row log-softmax at the headline vocabularies. Called directly: the decode
    step and the trainer's forward launch them with the same specializations
    (tests/engine/model/test_invariant_specialization.py), and the matmul's come from `invariant_matmul`."""
    page, segment = 16, BatchInvariant(16).segment
    for _, _, heads, kv_heads, head_dim, _ in models:
        for dtype in DTYPES:
            q = torch.randn(2, heads, head_dim, dtype=dtype)
            k, v = (torch.randn(64, kv_heads, head_dim, dtype=dtype) for _ in range(2))
            table = torch.tensor([[32, 0], [16, 48]], dtype=torch.int32)  # key rows of each page
            segment_attention(q, k, v, torch.tensor([20, 5]), torch.tensor([0, 1]), table, page, segment, 31)
    for vocab in VOCABS:
        logits = torch.randn(2, vocab)  # fp32: the mode's logits, which the fused sampler reads too
        row_logprobs(logits, torch.randint(0, vocab, (2,)), torch.ones(2))
    sample_triton(logits, torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2),
                  torch.arange(2), torch.full((2,), 7), torch.zeros(2))
    # bf16, the decode step's logits, with a top-p cut (the kernels specialize on the dtype)
    sample_triton(logits.bfloat16(), torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.full((2,), 0.9),
                  torch.arange(2), torch.full((2,), 7), torch.zeros(2))


def tiny_model(name: str, hidden: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool,
               intermediate: int = 256, dtype=torch.bfloat16) -> CausalLM:
    config = ModelConfig(
        model_type="qwen3" if qk_norm else "llama", vocab_size=512, hidden_size=hidden,
        intermediate_size=intermediate, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6, max_model_len=256, tie_word_embeddings=False, qkv_bias=name.startswith("Qwen2"),
        o_bias=False, mlp_bias=False, qk_norm=qk_norm, rope_theta=1e6)
    model = CausalLM(config, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def generation(models=MODELS) -> None:
    """A prefill and a few decode steps of each model shape, paged with 16-token blocks."""
    for shape in models:
        llm = LLM(tiny_model(*shape), kv_cache_memory=1 << 24, use_cuda_graphs=False)
        llm.generate([list(range(1, 20)), list(range(3, 40))],
                     SamplingParams(max_new_tokens=3, temperature=1.0, seed=0))


def bench_engine(rows: int = GRAPH_ROWS, context: int = GRAPH_CONTEXT) -> None:
    """The bench's engine as it starts on a GPU, before its first row: the decode step at each of
    its graph sizes (1, 2, 4, 8, 16, 32, ... rows), as the warm-up before each capture runs it.
    bf16 Qwen2.5-0.5B at two layers (the first layer's norm has no residual to add, every later
    one's has: two layers make every launch of 24), the engine's rows and context (its tables'
    width is a launch argument), split as on an H100's or H200's SMs. Recorded unexecuted: a
    graph's step reads nothing back, and a vocabulary-wide LM head per size would take this CPU
    minutes. Checked against a visit: run at the commit of the H200 visit of 2026-11-28 and
    compiled under the GPU's key, it recorded 34 compiles, each one that visit's engine made
    before its first row (bench/results/2026-11-28-h200/call1/triton_compiles.jsonl: the other 4
    of those 38 are its prefill's, which `generation` covers)."""
    model = qwen_like(2, torch.bfloat16, "cpu", max_model_len=context)
    with mock.patch.object(paged, "sm_count", lambda device: GPU_SMS):
        llm = LLM(model, kv_cache_memory=64 << 20, max_num_seqs=rows, use_cuda_graphs=False)
        with value_checks_as_on_gpu(), unexecuted():
            DecodeGraphs(llm.runner, rows, capture=False)


def large_decode_gemms(models=LARGE_MODELS) -> None:
    """Decode's fused norm + q/k/v and norm + gate/up GEMMs (4 rows, bf16) at each large model's
    hidden size, their K and a constexpr. The output widths are runtime ints that only pick the
    column tile (16 up to 2048 outputs, 32 above): one width of each model's class stands in for
    q/k/v and gate/up (a whole 7B layer in the interpreter takes minutes)."""
    for _, hidden, heads, kv_heads, head_dim, _, intermediate in models:
        x, residual = (torch.randn(4, hidden, dtype=torch.bfloat16) for _ in range(2))
        norm_weight = torch.ones(hidden, dtype=torch.bfloat16)
        for width, glu in (((heads + 2 * kv_heads) * head_dim, False), (intermediate, True)):
            stand_in = width if width <= 2048 else 2064  # above 2048, a multiple of 16 as theirs
            weight = torch.randn((2 if glu else 1) * stand_in, hidden, dtype=torch.bfloat16) / 30
            norm_linear(x, residual, norm_weight, 1e-6, weight, None, glu)


def decode_splits_at_long_context(models=LARGE_MODELS) -> None:
    """The paged decode (RoPE and store in the launch) at each large model's attention shape in
    bf16, with the splits decode_splits picks on an H100 for batch 1 and 32 at 4k and 32k tokens (on
    the CPU a launch takes 1): a short context stands in, the split count being a constexpr."""
    page = 16
    for _, _, heads, kv_heads, head_dim, _, _ in models:
        splits = {decode_splits(batch * kv_heads, context // page, page, GPU_SMS)
                  for batch in (1, 32) for context in (4096, 32768)}
        paged_decode_at(heads, kv_heads, head_dim, sorted(splits))


def paged_decode_at(heads: int, kv_heads: int, head_dim: int, splits) -> None:
    """rope_store_decode_triton (bf16, pages of 16) at this attention shape, once per split count,
    on two short contexts."""
    page = 16
    for num_splits in splits:
        q = torch.randn(2, heads, head_dim, dtype=torch.bfloat16)
        k, v = (torch.randn(2, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(2))
        k_cache, v_cache = (torch.randn(8, page, kv_heads, head_dim, dtype=torch.bfloat16)
                            for _ in range(2))
        table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
        cos, sin = torch.ones(64, head_dim), torch.zeros(64, head_dim)
        positions, slots = torch.tensor([40, 20]), torch.tensor([40, 84])
        lens = torch.tensor([41, 21], dtype=torch.int32)
        rope_store_decode_triton(q, k, v, cos, sin, positions, k_cache, v_cache, slots, table,
                                 lens, head_dim ** -0.5, num_splits=num_splits)


def decode_tune(shape=tune_decode.QWEN_05B) -> None:
    """bench/tune_decode.py's launches, which a visit times: its candidate tiles of the norm + GEMM
    kernel for each decode projection and row count, and the paged decode at each split count. The
    rows and the output widths are runtime ints (a multiple of 16 stands in for each width, 4 rows
    for each count: the tiles are what the count picks)."""
    for rows in shape.rows:
        for _, width, k, has_bias, glu, _ in tune_decode.projections(shape):
            x, residual = (torch.randn(4, k, dtype=torch.bfloat16) for _ in range(2))
            norm_weight = torch.ones(k, dtype=torch.bfloat16)
            weight = torch.randn(64 if glu else 32, k, dtype=torch.bfloat16) / 30
            bias = torch.randn(weight.shape[0], dtype=torch.bfloat16) if has_bias else None
            for tiles in tune_decode.candidates(rows, width // 2 if glu else width):
                norm_linear_launch(x, residual, norm_weight, 1e-6, weight, bias, glu, tiles)
    paged_decode_at(shape.heads, shape.kv_heads, shape.head_dim, tune_decode.SPLITS)


def moe(hidden: int = 2048, experts: int = 8, top_k: int = 2) -> None:
    """The MoE layer's permute and weighted unpermute, forward and backward, at Qwen3-30B-A3B's width."""
    for dtype in DTYPES:
        x = torch.randn(TOKENS, hidden, dtype=dtype, requires_grad=True)
        order, slot_rows, _ = kernels.moe_sort(torch.randint(0, experts, (TOKENS, top_k)), experts)
        weights = torch.rand(TOKENS, top_k, requires_grad=True)
        rows = kernels.moe_permute(x, order, top_k)
        kernels.moe_unpermute(rows, order, slot_rows, weights).float().sum().backward()


def moe_gemms(experts: int = 128, top_k: int = 8, tokens: int = 4) -> None:
    """The Triton grouped GEMM (where torch's grouped_mm would read its offsets on the host: fp32,
    or bf16 before sm_90), forward and both gradients, with Qwen3-30B-A3B's 128 experts and top-8
    (the experts' count picks a block size). Its widths (2048 hidden, 2 x 768 gate/up) are runtime
    ints of one specialization class, multiples of 16: 64 and 32 stand in, to keep the weights
    small."""
    for dtype in DTYPES:
        ids = torch.randint(0, experts, (tokens, top_k))
        _, _, offsets = kernels.moe_sort(ids, experts)
        rows = torch.randn(tokens * top_k, 64, dtype=dtype, requires_grad=True)
        weight = torch.randn(experts, 32, 64, dtype=dtype, requires_grad=True)
        grouped_gemm(rows, weight, offsets).float().sum().backward()


def run(quick: bool = False) -> None:
    """The whole workload on the triton backend (the interpreter on the CPU). `quick` (a fast local check):
    one vocabulary per alignment class and the two small models, which still reach every kernel."""
    with kernels.use_backend("triton"):
        ops(VOCABS[1:] if quick else VOCABS)
        lm_head(quick)
        fp32_gemms()
        moe()
        moe_gemms()
        generation(MODELS[:2] if quick else MODELS)
        bench_engine()
        if not quick:  # ~90 s of interpreter (K = 3584): the full check's, .ci/run's
            large_decode_gemms()
        decode_splits_at_long_context()
        decode_tune()
        invariant_matmul()
        invariant_mode()
