// Device helpers shared by the fusedrl kernels: dtype conversion, warp/block reductions, and the
// host-side switches from runtime dtypes to template instantiations.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fusedrl_cuda.h"

namespace fusedrl {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// All math is fp32; inputs are converted on load, outputs rounded to nearest on store.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// A mask element is valid when nonzero; masks of every integer width are read as unsigned.
template <typename MaskT>
__device__ __forceinline__ bool is_valid(const MaskT* mask, int64_t i) {
  return mask == nullptr || mask[i] != 0;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}

// Sum over a block of kThreads threads; the result is valid in every thread. Fixed reduction
// order, so it is deterministic. `scratch` holds kThreads / 32 floats; it is reusable on return.
template <int kThreads>
__device__ float block_sum(float x, float* scratch) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize, "block size");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = warp_sum(lane < kWarps ? scratch[lane] : 0.0f);
  __syncthreads();
  return x;
}

template <int kThreads>
__device__ float block_max(float x, float* scratch) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  x = warp_max(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = warp_max(lane < kWarps ? scratch[lane] : -INFINITY);
  __syncthreads();
  return x;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runtime dtype -> a call of f with a value of the matching element type (f picks the template).
template <typename F>
cudaError_t dispatch_float(FloatType dtype, F&& f) {
  switch (dtype) {
    case FloatType::kFloat32: return f(float{});
    case FloatType::kBFloat16: return f(__nv_bfloat16{});
    case FloatType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// Runtime mask width in bytes -> f with an unsigned integer of that width.
template <typename F>
cudaError_t dispatch_mask(int mask_bytes, F&& f) {
  switch (mask_bytes) {
    case 1: return f(uint8_t{});
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedrl
