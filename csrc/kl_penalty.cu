// Per-token KL penalty estimators (k1, k2, k3 of d = ref_logp - logp), forward and backward, as in
// kernels/rl/kl.py: elementwise, fp32 math, 0 (and no read) outside the mask.
#include "common.cuh"

namespace fusedrl {
namespace {

constexpr int kThreads = 256;

struct KlTerms {
  float kl, dkl;  // the estimate and its derivative w.r.t. logp
};

// The estimator is uniform over the launch, so the switch costs no divergence.
__device__ __forceinline__ KlTerms kl_terms(float logp, float ref_logp, int estimator) {
  const float d = ref_logp - logp;
  switch (estimator) {
    case 0: return {-d, 1.0f};
    case 1: return {0.5f * d * d, -d};
    default: {
      const float e = expf(d);
      return {e - d - 1.0f, 1.0f - e};
    }
  }
}

template <typename T, typename MaskT>
__global__ void __launch_bounds__(kThreads) kl_fwd_kernel(
    const T* __restrict__ logp, const T* __restrict__ ref_logp,
    const MaskT* __restrict__ mask,   // nullptr: all valid
    float* __restrict__ out,          // [n] fp32
    int64_t n, int estimator) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kThreads) {
    out[i] = is_valid(mask, i) ? kl_terms(to_float(logp[i]), to_float(ref_logp[i]), estimator).kl
                               : 0.0f;
  }
}

template <typename T, typename MaskT>
__global__ void __launch_bounds__(kThreads) kl_bwd_kernel(
    const float* __restrict__ grad_out, const T* __restrict__ logp, const T* __restrict__ ref_logp,
    const MaskT* __restrict__ mask,
    T* __restrict__ grad_logp,        // [n] in the inputs' dtype; grad w.r.t. ref is its negative
    int64_t n, int estimator) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kThreads) {
    const float grad = is_valid(mask, i)
        ? grad_out[i] * kl_terms(to_float(logp[i]), to_float(ref_logp[i]), estimator).dkl : 0.0f;
    grad_logp[i] = from_float<T>(grad);
  }
}

// Enough blocks to fill any current GPU several times over; the grid-stride loop does the rest.
unsigned elementwise_blocks(int64_t n) {
  constexpr int64_t kMaxBlocks = 65536;
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

}  // namespace

cudaError_t kl_penalty_fwd(const void* logp, const void* ref_logp, FloatType dtype,
                           const void* mask, int mask_bytes, float* out, int64_t n,
                           int estimator, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_mask(mask_bytes, [&](auto mask_tag) {
      using MaskT = decltype(mask_tag);
      kl_fwd_kernel<T, MaskT><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          static_cast<const T*>(logp), static_cast<const T*>(ref_logp),
          static_cast<const MaskT*>(mask), out, n, estimator);
      return cudaGetLastError();
    });
  });
}

cudaError_t kl_penalty_bwd(const float* grad_out, const void* logp, const void* ref_logp,
                           FloatType dtype, const void* mask, int mask_bytes, void* grad_logp,
                           int64_t n, int estimator, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_mask(mask_bytes, [&](auto mask_tag) {
      using MaskT = decltype(mask_tag);
      kl_bwd_kernel<T, MaskT><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          grad_out, static_cast<const T*>(logp), static_cast<const T*>(ref_logp),
          static_cast<const MaskT*>(mask), static_cast<T*>(grad_logp), n, estimator);
      return cudaGetLastError();
    });
  });
}

}  // namespace fusedrl
