// Fused log-softmax + gather of the label's log-prob (and the entropy), forward and backward.
// Same math as kernels/rl/logprobs.py: one block per row, an online max / sum-exp in fp32, the row's
// logsumexp saved for backward, -inf logits contributing their limit (0), ignored rows skipped.
#include "common.cuh"

namespace fusedrl {
namespace {

constexpr int kThreads = 256;

// Online softmax statistics of a set of scaled logits z, centred on their max m:
//   s = sum exp(z - m),  t = sum exp(z - m) * (z - m)  (t only for the entropy).
// While every z so far is -inf, m is -inf and s = t = 0.
struct RowStats {
  float m, s, t;
};

__device__ __forceinline__ RowStats empty_stats() { return {-INFINITY, 0.0f, 0.0f}; }

// Shift to subtract before exp(): m itself, or 0 while m is -inf (avoids -inf - -inf = NaN).
__device__ __forceinline__ float safe_shift(float m) { return m == -INFINITY ? 0.0f : m; }

// a's sums re-centred on a max m >= a.m: scaled by alpha = exp(a.m - m), and t shifted by
// (a.m - m) * s. The shift is only formed when a.s > 0: for a.m = -inf it would be 0 * -inf.
__device__ __forceinline__ RowStats rescale(RowStats a, float m) {
  const float shift = safe_shift(m);
  const float alpha = __expf(a.m - shift);
  return {m, a.s * alpha, alpha * (a.t + (a.s > 0.0f ? (a.m - shift) * a.s : 0.0f))};
}

__device__ __forceinline__ RowStats merge(RowStats a, RowStats b) {
  const float m = fmaxf(a.m, b.m);
  a = rescale(a, m);
  b = rescale(b, m);
  return {m, a.s + b.s, a.t + b.t};
}

// Adds kVec scaled logits to the running stats: one exp per element, plus one rescale when the
// vector raises the max (rare once the row's large logits have been seen). A NaN logit leaves the
// max alone (fmaxf) and turns s into NaN, so the row's outputs are NaN, as in PyTorch.
template <int kVec, bool kEntropy>
__device__ __forceinline__ void accumulate(RowStats& st, const float (&z)[kVec]) {
  float m = st.m;
#pragma unroll
  for (int i = 0; i < kVec; ++i) m = fmaxf(m, z[i]);
  if (m != st.m) st = rescale(st, m);
  const float shift = safe_shift(m);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float e = __expf(z[i] - shift);
    st.s += e;
    // A -inf logit contributes its limit 0, not 0 * -inf.
    if (kEntropy) st.t += e > 0.0f ? e * (z[i] - shift) : 0.0f;
  }
}

__device__ __forceinline__ RowStats warp_merge(RowStats st) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const RowStats other = {__shfl_xor_sync(kFullMask, st.m, offset),
                            __shfl_xor_sync(kFullMask, st.s, offset),
                            __shfl_xor_sync(kFullMask, st.t, offset)};
    st = merge(st, other);
  }
  return st;
}

// The row's stats from every thread's; the result is valid in thread 0.
__device__ RowStats block_merge(RowStats st) {
  __shared__ RowStats scratch[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  st = warp_merge(st);
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  return warp_merge(lane < kThreads / kWarpSize ? scratch[lane] : empty_stats());
}

// kVec elements per load: 16 bytes when the rows are 16-byte aligned, else 1.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T, typename LabelT, int kVec, bool kEntropy>
__global__ void __launch_bounds__(kThreads) token_logprobs_fwd_kernel(
    const T* __restrict__ logits,        // [n_rows, n_cols], row stride row_stride
    const LabelT* __restrict__ labels,   // [n_rows]
    float* __restrict__ logp,            // [n_rows] out
    float* __restrict__ entropy,         // [n_rows] out (only if kEntropy)
    float* __restrict__ lse,             // [n_rows] out
    int64_t n_cols, int64_t row_stride, float inv_temperature, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t label = static_cast<int64_t>(labels[row]);
  if (label == ignore_index) {  // uniform across the block: no thread reaches a barrier below
    if (threadIdx.x == 0) {
      logp[row] = 0.0f;
      lse[row] = 0.0f;
      if (kEntropy) entropy[row] = 0.0f;
    }
    return;
  }
  const T* row_ptr = logits + row * row_stride;
  RowStats st = empty_stats();
  const int64_t n_vec = n_cols / kVec;
  const auto* vec_ptr = reinterpret_cast<const Vec<T, kVec>*>(row_ptr);
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const Vec<T, kVec> v = vec_ptr[i];
    float z[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) z[k] = to_float(v.v[k]) * inv_temperature;
    accumulate<kVec, kEntropy>(st, z);
  }
  for (int64_t col = n_vec * kVec + threadIdx.x; col < n_cols; col += kThreads) {
    const float z[1] = {to_float(row_ptr[col]) * inv_temperature};
    accumulate<1, kEntropy>(st, z);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const float log_s = logf(st.s);
    const float row_lse = safe_shift(st.m) + log_s;
    // An out-of-vocabulary label (possible only when the host checks were skipped) gives NaN.
    const float z_label = label >= 0 && label < n_cols
        ? to_float(row_ptr[label]) * inv_temperature : NAN;
    logp[row] = z_label - row_lse;
    lse[row] = row_lse;
    // H = lse - E[z] = log s - t / s, both sums centred on m.
    if (kEntropy) entropy[row] = log_s - st.t / st.s;
  }
}

// d(g_logp * logp + g_entropy * H) / d z for one element, times 1 / T (z = x / T).
template <bool kEntropyGrad>
__device__ __forceinline__ float grad_element(float z, bool is_label, float row_lse, float g_logp,
                                              float g_entropy, float row_entropy,
                                              float inv_temperature) {
  const float log_p = z - row_lse;
  const float p = __expf(log_p);
  // d logp / dz = onehot(label) - p
  float grad_z = g_logp * ((is_label ? 1.0f : 0.0f) - p);
  // dH/dz = -p * (log p + H); 0 for a -inf logit (p = 0), not 0 * -inf.
  if (kEntropyGrad) grad_z -= g_entropy * (z == -INFINITY ? 0.0f : p * (log_p + row_entropy));
  return grad_z * inv_temperature;
}

template <typename T, typename LabelT, int kVec, bool kEntropyGrad>
__global__ void __launch_bounds__(kThreads) token_logprobs_bwd_kernel(
    const T* logits,                          // [n_rows, n_cols]; may alias grad_logits
    const LabelT* __restrict__ labels,        // [n_rows]
    const float* __restrict__ lse,            // [n_rows] from forward
    const float* __restrict__ entropy,        // [n_rows] from forward (only if kEntropyGrad)
    const float* __restrict__ grad_logp,      // [n_rows]
    const float* __restrict__ grad_entropy,   // [n_rows] (only if kEntropyGrad)
    T* grad_logits,                           // [n_rows, n_cols] out, row stride grad_row_stride
    int64_t n_cols, int64_t row_stride, int64_t grad_row_stride, float inv_temperature,
    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t label = static_cast<int64_t>(labels[row]);
  const bool ignored = label == ignore_index;
  const T* row_ptr = logits + row * row_stride;
  T* grad_row = grad_logits + row * grad_row_stride;
  const float row_lse = ignored ? 0.0f : lse[row];
  const float g_logp = ignored ? 0.0f : grad_logp[row];
  const float g_entropy = kEntropyGrad && !ignored ? grad_entropy[row] : 0.0f;
  const float row_entropy = kEntropyGrad && !ignored ? entropy[row] : 0.0f;
  const int64_t n_vec = n_cols / kVec;
  const auto* vec_in = reinterpret_cast<const Vec<T, kVec>*>(row_ptr);
  auto* vec_out = reinterpret_cast<Vec<T, kVec>*>(grad_row);
  // Each element is read and then written by the same thread, so in place is safe.
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    Vec<T, kVec> v;
    if (ignored) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) v.v[k] = from_float<T>(0.0f);
    } else {
      v = vec_in[i];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int64_t col = i * kVec + k;
        v.v[k] = from_float<T>(grad_element<kEntropyGrad>(
            to_float(v.v[k]) * inv_temperature, col == label, row_lse, g_logp, g_entropy,
            row_entropy, inv_temperature));
      }
    }
    vec_out[i] = v;
  }
  for (int64_t col = n_vec * kVec + threadIdx.x; col < n_cols; col += kThreads) {
    grad_row[col] = from_float<T>(ignored ? 0.0f : grad_element<kEntropyGrad>(
        to_float(row_ptr[col]) * inv_temperature, col == label, row_lse, g_logp, g_entropy,
        row_entropy, inv_temperature));
  }
}

bool aligned16(const void* ptr, int64_t row_stride, int64_t element_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * element_bytes) % 16 == 0;
}

// Runtime label width -> f with the matching signed integer type.
template <typename F>
cudaError_t dispatch_label(int label_bytes, F&& f) {
  switch (label_bytes) {
    case 4: return f(int32_t{});
    case 8: return f(int64_t{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t token_logprobs_fwd(const void* logits, FloatType dtype, const void* labels,
                               int label_bytes, float* logp, float* entropy, float* lse,
                               int64_t n_rows, int64_t n_cols, int64_t row_stride,
                               float inv_temperature, int64_t ignore_index, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = aligned16(logits, row_stride, sizeof(T));
    return dispatch_label(label_bytes, [&](auto label_tag) {
      using LabelT = decltype(label_tag);
      const bool e = entropy != nullptr;
      const auto kernel = vec ? (e ? token_logprobs_fwd_kernel<T, LabelT, kVec, true>
                                   : token_logprobs_fwd_kernel<T, LabelT, kVec, false>)
                              : (e ? token_logprobs_fwd_kernel<T, LabelT, 1, true>
                                   : token_logprobs_fwd_kernel<T, LabelT, 1, false>);
      kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
          static_cast<const T*>(logits), static_cast<const LabelT*>(labels), logp, entropy, lse,
          n_cols, row_stride, inv_temperature, ignore_index);
      return cudaGetLastError();
    });
  });
}

cudaError_t token_logprobs_bwd(const void* logits, FloatType dtype, const void* labels,
                               int label_bytes, const float* lse, const float* entropy,
                               const float* grad_logp, const float* grad_entropy,
                               void* grad_logits, int64_t n_rows, int64_t n_cols,
                               int64_t row_stride, int64_t grad_row_stride,
                               float inv_temperature, int64_t ignore_index, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = aligned16(logits, row_stride, sizeof(T))
        && aligned16(grad_logits, grad_row_stride, sizeof(T));
    return dispatch_label(label_bytes, [&](auto label_tag) {
      using LabelT = decltype(label_tag);
      const bool e = grad_entropy != nullptr;
      const auto kernel = vec ? (e ? token_logprobs_bwd_kernel<T, LabelT, kVec, true>
                                   : token_logprobs_bwd_kernel<T, LabelT, kVec, false>)
                              : (e ? token_logprobs_bwd_kernel<T, LabelT, 1, true>
                                   : token_logprobs_bwd_kernel<T, LabelT, 1, false>);
      kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
          static_cast<const T*>(logits), static_cast<const LabelT*>(labels), lse, entropy,
          grad_logp, grad_entropy, static_cast<T*>(grad_logits), n_cols, row_stride,
          grad_row_stride, inv_temperature, ignore_index);
      return cudaGetLastError();
    });
  });
}

}  // namespace fusedrl
