"""Triton paged-KV kernels against their PyTorch references.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported, as the test command does); shapes stay tiny because the interpreter is slow. The decode
reference is itself checked against a per-sequence dense attention written independently.
"""

import pytest
import torch

from fusedrl.kernels import reference, use_backend
from fusedrl.kernels.attention.paged import (MAX_SPLITS, decode_splits, paged_decode_triton,
                                             rope_store_decode, rope_store_decode_triton, store_kv,
                                             store_kv_triton)
from kernel_testing import DEVICE, ULP, assert_close, needs_triton

pytestmark = needs_triton


def _paged_batch(context_lens, num_heads, num_kv_heads, head_dim, page, dtype, seed=0):
    """Random caches and a scrambled block table holding sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // page) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns, filled with garbage too
    k_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(context_lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = torch.tensor(order[:n])
        order = order[n:]
    # Slots no sequence wrote may hold anything, NaN included (the pool comes from torch.empty).
    written = torch.zeros(num_blocks * page, dtype=torch.bool)
    for i, n in enumerate(context_lens):
        for pos in range(n):
            written[table[i, pos // page] * page + pos % page] = True
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[~written.to(DEVICE)] = float("nan")
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g).to(DEVICE, dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, table.to(DEVICE), lens


def _dense_decode(q, k_cache, v_cache, table, lens):
    """Per sequence: gather its tokens in order, plain softmax attention in float64."""
    out = []
    group = q.shape[1] // k_cache.shape[2]
    for i, n in enumerate(lens.tolist()):
        blocks = table[i, : -(-n // k_cache.shape[1])].long()
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, 1)  # [n, H, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[i].double(), k) * q.shape[-1] ** -0.5
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


# (context lengths, heads, kv heads, head dim, page): GQA groups 1, 2 and 3 (padded to 4), a head
# dim and a page size that are not powers of two, lengths ending mid-page and on a page boundary.
SHAPES = [([5, 1, 16], 4, 2, 16, 4), ([9, 3], 2, 2, 24, 8), ([13, 8, 2], 6, 2, 8, 4), ([7, 12], 4, 1, 16, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_reference_matches_dense_attention(shape):
    lens, h, hkv, d, page = shape
    args = _paged_batch(lens, h, hkv, d, page, torch.float32)
    expected = _dense_decode(*args)
    torch.testing.assert_close(reference.paged_decode(*args, d ** -0.5).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_decode_matches_reference(shape, dtype, atol, num_splits):
    lens, h, hkv, d, page = shape
    args = _paged_batch(lens, h, hkv, d, page, dtype)
    expected = _dense_decode(*args)
    # fp16: inputs are exact in both; the kernel accumulates in fp32 and rounds its output to fp16
    # (relative 2^-11), so a few 1e-4 on outputs of magnitude ~1; 2e-3 leaves a margin.
    out = paged_decode_triton(*args, d ** -0.5, num_splits=num_splits)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


def test_triton_decode_with_more_splits_than_pages():
    # 8 splits over sequences of 1 to 4 pages: most splits see nothing and must weigh nothing.
    args = _paged_batch([3, 16, 9], 4, 2, 16, 4, torch.float32)
    out = paged_decode_triton(*args, 0.25, num_splits=8)
    torch.testing.assert_close(out.double(), _dense_decode(*args), atol=1e-5, rtol=0)


# (batch, KV heads, context tokens) -> splits on an H100's 132 SMs (16-token pages)
@pytest.mark.parametrize("batch,kv_heads,context,splits", [
    (1, 4, 4096, 64), (1, 4, 32768, 64),  # Qwen2.5-7B at batch 1: 256 programs, two per SM
    (1, 8, 4096, 32),  # Llama-3-8B: 256 programs too
    (1, 4, 1024, 16),  # a short context: runs of at least 64 tokens (64 programs)
    (1, 4, 16, 1),  # one page: one split
    (128, 4, 4096, 1), (32, 4, 4096, 2),  # a large batch fills the SMs alone
])
def test_decode_splits_fill_the_sms_from_batch_heads_and_context(batch, kv_heads, context, splits):
    got = decode_splits(batch * kv_heads, context // 16, 16, 132)
    assert got == splits and got & (got - 1) == 0 and got <= MAX_SPLITS
    if context >= 4096:
        assert batch * kv_heads * got >= 132  # at least one program per SM


def test_triton_decode_at_the_batch_1_split_count_of_a_long_context():
    """decode_splits' 64 (batch 1, 4 KV heads, 4k context) over a shorter context in the
    interpreter: every split the combine reads, most of them empty, weighs what it saw."""
    args = _paged_batch([37], 8, 4, 16, 4, torch.float32)
    out = paged_decode_triton(*args, 0.25, num_splits=decode_splits(4, 4096 // 16, 16, 132))
    torch.testing.assert_close(out.double(), _dense_decode(*args), atol=1e-5, rtol=0)


def test_triton_decode_padding_row_is_finite_and_ignored():
    q, k_cache, v_cache, table, lens = _paged_batch([6, 3], 4, 2, 16, 4, torch.float32)
    lens[1] = 0  # a CUDA-graph padding row
    out = paged_decode_triton(q, k_cache, v_cache, table, lens, 0.25, num_splits=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1].double(), _dense_decode(q[:1], k_cache, v_cache, table[:1], lens[:1]),
                               atol=1e-5, rtol=0)


def _new_tokens(lens, h, hkv, d, table, page, dtype, seed=1):
    """The decode step's own tokens: q, k, v [B, *, D] as strided views of one packed q/k/v row (as the
    projection writes them), RoPE tables [max(64, longest), D], positions (len - 1) and slots (-1 for a 0 length)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(len(lens), (h + 2 * hkv) * d, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=1)
    angles = torch.randn(max(64, int(lens.max())), d // 2, generator=g).repeat(1, 2)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    pos = (lens.long() - 1).clamp(min=0)
    block = table.long().clamp(min=0).gather(1, (pos // page)[:, None])[:, 0]
    slots = torch.where(lens > 0, block * page + pos % page, -1)
    return q.view(-1, h, d), k.view(-1, hkv, d), v.view(-1, hkv, d), cos, sin, pos, slots


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_store_decode_is_rope_then_store_then_decode(shape, dtype, num_splits):
    """The fused decode step: its own token rotated and stored (the slot read by nobody else in the
    launch: unwritten slots hold NaN), attended to from registers, the rest from the pages."""
    lens, h, hkv, d, page = shape
    lens = lens + [0]  # a CUDA-graph padding row: nothing stored, output finite
    _, k_cache, v_cache, table, lens_t = _paged_batch(lens, h, hkv, d, page, dtype)
    q, k, v, cos, sin, pos, slots = _new_tokens(lens_t, h, hkv, d, table, page, dtype)
    for cache in (k_cache, v_cache):  # the new token's slot is not written yet
        cache.view(-1, hkv, d)[slots[slots >= 0]] = float("nan")
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = reference.rope(q.double(), k.double(), cos[pos].double(), sin[pos].double())
    reference.store_kv(k_rot.to(dtype).contiguous(), v.contiguous(), expected_k, expected_v, slots)
    expected = _dense_decode(q_rot, expected_k, expected_v, table, lens_t)

    out = rope_store_decode_triton(q, k, v, cos, sin, pos, k_cache, v_cache, slots, table, lens_t, d ** -0.5,
                                   num_splits=num_splits)
    ulp = 2.0 ** -20 if dtype == torch.float32 else ULP[dtype]
    live = slots >= 0
    assert_close(k_cache.view(-1, hkv, d)[slots[live]], expected_k.view(-1, hkv, d)[slots[live]],
                 atol=2 * ulp, rtol=2 * ulp, name="stored k")
    assert torch.equal(v_cache.view(-1, hkv, d)[slots[live]], v[live])
    assert torch.isfinite(out[-1]).all()
    atol = 1e-5 if dtype == torch.float32 else 4 * ulp  # bf16: q and k rounded after RoPE, then the output
    assert_close(out[:-1], expected[:-1], atol=atol, rtol=0, name=f"rope_store_decode {shape} {dtype}")


@pytest.mark.parametrize("store", [store_kv_triton, reference.store_kv])
def test_store_kv_writes_exactly_the_mapped_slots(store):
    g = torch.Generator().manual_seed(0)
    num_blocks, page, hkv, d = 5, 4, 2, 12
    k_cache = torch.zeros(num_blocks, page, hkv, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(6, hkv, d, generator=g).to(DEVICE)
    v = torch.randn(6, hkv, d, generator=g).to(DEVICE)
    slots = torch.tensor([0, 7, -1, 19, 4, 10], device=DEVICE)  # -1: a padding row, written nowhere
    store(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(num_blocks * page) if s not in written]
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


def test_store_kv_packs_tokens_across_programs():
    # 128-element rows go 8 tokens to a program; 21 tokens leave the last program part-filled.
    g = torch.Generator().manual_seed(1)
    k_cache = torch.zeros(8, 4, 2, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k, v = (torch.randn(21, 2, 64, generator=g).to(DEVICE) for _ in range(2))
    slots = torch.randperm(32, generator=g)[:21].to(DEVICE)
    slots[5] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, expected_k, expected_v, slots)
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_store_kv_rejects_mismatched_shapes():
    k = torch.zeros(2, 2, 8)
    cache = torch.zeros(3, 4, 2, 16)
    with pytest.raises(ValueError, match="do not fit caches"):
        reference.store_kv(k, k, cache, cache, torch.zeros(2, dtype=torch.int64))


def _store_inputs(n=3):
    cache = torch.zeros(2, 4, 2, 8, device=DEVICE)  # 8 slots
    return torch.randn(n, 2, 8, device=DEVICE), cache, cache.clone()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["k_cache dtype", "v dtype", "cache device", "slots device", "slot past the pool",
                                  "slot below -1"])
def test_store_kv_names_bad_caches_and_slots(case, backend, monkeypatch):
    """Caches of k's dtype on k's device, and slots in the pool or -1 (a padding row, still taken):
    refused in one line before a write (the kernel would cast silently or write past the pool)."""
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")  # the slots' values are read on a GPU too
    k, k_cache, v_cache = _store_inputs()
    v, slots = k.clone(), torch.tensor([0, -1, 7], device=DEVICE)
    error, match = ValueError, None
    if case == "k_cache dtype":
        k_cache, error, match = k_cache.double(), TypeError, "store_kv: k_cache is torch.float64 but k is torch.float32"
    elif case == "v dtype":
        v, error, match = v.half(), TypeError, "store_kv: v is torch.float16 but k is torch.float32"
    elif case == "cache device":
        v_cache, match = v_cache.to("meta"), "store_kv: v_cache is on meta but k is on"
    elif case == "slots device":
        slots, match = slots.to("meta"), "store_kv: slot_mapping is on meta but k is on"
    elif case == "slot past the pool":
        slots[2], match = 8, r"store_kv: slot_mapping must be -1 \(skip\) or in \[0, 8\) \(blocks x page\); got 1 out of range \(first: 8\)"
    else:
        slots[1], match = -2, r"store_kv: slot_mapping must be -1 \(skip\) or in \[0, 8\).*first: -2"
    with use_backend(backend), pytest.raises(error, match=match):
        store_kv(k, v, k_cache, v_cache, slots)
    assert all(c.is_meta or c.abs().sum() == 0 for c in (k_cache, v_cache))  # nothing written


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rope_store_decode_names_a_slot_past_the_pool(backend, monkeypatch):
    monkeypatch.setenv("FUSEDRL_SYNC_CHECKS", "1")  # the slots' values are read on a GPU too
    q, k_cache, v_cache, table, lens = _paged_batch([5, 3], 4, 2, 16, 4, torch.float32)
    q, k, v, cos, sin, pos, slots = _new_tokens(lens, 4, 2, 16, table, 4, torch.float32)
    slots[0] = k_cache.shape[0] * 4
    with use_backend(backend), pytest.raises(ValueError, match=rf"rope_store_decode: slot_mapping must be -1 \(skip\) "
                                                               rf"or in \[0, {slots[0].item()}\)"):
        rope_store_decode(q, k, v, cos, sin, pos, k_cache, v_cache, slots, table, lens, 0.25)
    with use_backend(backend), pytest.raises(TypeError, match="rope_store_decode: k_cache is torch.float64"):
        rope_store_decode(q, k, v, cos, sin, pos, k_cache.double(), v_cache.double(), slots, table, lens, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 8, 64])
def test_rope_store_decode_at_the_decode_shape_on_a_gpu(num_splits):
    """Qwen2.5-0.5B's attention (14 heads on 2 KV heads of 64, pages of 16) in bf16 on the GPU (the
    `gpu` tests of a visit): the tiled walk's tensor-core dots over contexts of 384, 17 and 1
    tokens and a padding row, at one split, a few and decode_splits' 64 of a batch-1 step."""
    lens, h, hkv, d, page = [384, 17, 1, 0], 14, 2, 64, 16
    _, k_cache, v_cache, table, lens_t = _paged_batch(lens, h, hkv, d, page, torch.bfloat16)
    q, k, v, cos, sin, pos, slots = _new_tokens(lens_t, h, hkv, d, table, page, torch.bfloat16)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = reference.rope(q.double(), k.double(), cos[pos].double(), sin[pos].double())
    reference.store_kv(k_rot.to(torch.bfloat16).contiguous(), v.contiguous(), expected_k,
                       expected_v, slots)
    expected = _dense_decode(q_rot, expected_k, expected_v, table, lens_t)
    out = rope_store_decode_triton(q, k, v, cos, sin, pos, k_cache, v_cache, slots, table, lens_t,
                                   d ** -0.5, num_splits=num_splits)
    assert torch.isfinite(out[-1]).all()
    assert_close(out[:-1], expected[:-1], atol=4 * ULP[torch.bfloat16], rtol=0,
                 name=f"rope_store_decode at {num_splits} splits")
