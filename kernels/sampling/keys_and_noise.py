"""The split-row sampler's shared Triton device functions (used by chunk_stats.py and
window_draw.py): the 16-bit order key of a logit and back, the counter-based Gumbel noise, a
(score, index) pair packed into one int64 whose integer order is the draw's order (an atomic max
picks the winner), and a row's sampling parameters as every kernel reads them."""
from __future__ import annotations

from ..triton_compat import tl, triton


@triton.jit
def key16(x, IS_FP32: tl.constexpr):
    """int32 order key in [-32768, 32767] (sampler.order_key16) of logits x in their own dtype."""
    if IS_FP32:
        bits = x.to(tl.int32, bitcast=True) >> 16
    else:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFF, bits)


@triton.jit
def key16_value(key, IS_FP16: tl.constexpr):
    """fp32 value of an order key (sampler.key16_value)."""
    bits = tl.where(key < 0, key ^ 0x7FFF, key)
    if IS_FP16:
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def _mix32(x):
    """sampler._mix32 op for op, on int64 holding [0, 2^32): products wrap, the mask keeps their low
    32 bits (uint32 arithmetic would promote the constants above 2^31 to int64 and not wrap)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def gumbel(seed_ptr, pos_ptr, row, offs):
    """sampler.gumbel_noise for one row's vocabulary ids `offs` (any shape)."""
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row)
    row_hash = _mix32(_mix32(seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF))
    row_hash = _mix32(row_hash ^ (pos & 0xFFFFFFFF))
    bits = _mix32(_mix32(row_hash ^ offs.to(tl.int64)))
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(uniform))


@triton.jit
def pack_score(score, index):
    """int64 ordered as (score, -index): the fp32 bits made order-preserving in the high word, the
    inverted index in the low word, so the max is the best score and, among equals, the first
    index."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (0xFFFFFFFF - index.to(tl.int64))


@triton.jit
def unpack_score(packed):
    """(fp32 score, int32 index) of pack_score's int64."""
    bits = (packed >> 32).to(tl.int32)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(tl.float32, bitcast=True), (0xFFFFFFFF - (packed & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def value_key16(v, IS_FP32: tl.constexpr, IS_FP16: tl.constexpr):
    """The order key of an fp32 value v as a logit of the sampler's dtype (rounded to it:
    monotone)."""
    if IS_FP32:
        return key16(v, True)
    elif IS_FP16:
        return key16(v.to(tl.float16), False)
    else:
        return key16(v.to(tl.bfloat16), False)


@triton.jit
def row_params(temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, row, V):
    """(inverse temperature, top-k or V when off, top-p, greedy, has top-k/top-p cut, needs a 2nd
    pass)."""
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0
    inv_temp = 1.0 / tl.where(greedy, 1.0, temp)
    top_k = tl.load(top_k_ptr + row)
    top_k = tl.where((top_k > 0) & (top_k < V), top_k, V)
    top_p = tl.load(top_p_ptr + row)
    cut = (greedy == 0) & ((top_k < V) | (top_p < 1))
    second = cut | ((greedy == 0) & (tl.load(min_p_ptr + row) > 0))
    return inv_temp, top_k, top_p, greedy, cut, second


@triton.jit
def row_log_min_p(min_p_ptr, row):
    """log(min_p), -inf when off: a token is kept by min-p when its scaled logit - max >= this."""
    min_p = tl.load(min_p_ptr + row)
    return tl.where(min_p > 0, tl.log(tl.maximum(min_p, 1e-38)), float("-inf"))
