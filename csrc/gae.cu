// GAE as a single pass of a segmented affine scan per row, one warp per row.
//
// As in kernels/rl/advantages.py: with G_t = V_t + lam * A_t, a valid step t maps the G entering it
// from the future, x, to gamma * lam * x + ((1 - lam) * V_t + lam * r_t); an invalid step passes x
// through (the identity), which is exactly "skip masked positions and bootstrap from the next valid
// one". After the row's end x = 0 (terminal). Then A_t = r_t - V_t + gamma * x for valid t, where x
// is what enters t, and A_t = 0 elsewhere; returns = A + V on valid positions, 0 elsewhere.
//
// The warp walks the row from its end in chunks of 32 * kItems steps. Each lane composes the maps
// of its kItems consecutive steps, a shuffle scan over the lanes composes those across the warp,
// and each lane then replays its steps from the x entering them. The chunk's result is the carry
// into the next (earlier) chunk. Invalid steps' rewards and values are never read.
#include "common.cuh"

namespace fusedrl {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kItems = 8;                    // consecutive time steps per lane
constexpr int kChunk = kWarpSize * kItems;   // time steps per warp iteration

struct Affine {
  float a, b;  // x -> a * x + b
};

// The map "apply first, then second".
__device__ __forceinline__ Affine then(Affine first, Affine second) {
  return {second.a * first.a, second.a * first.b + second.b};
}

__device__ __forceinline__ Affine shfl_up(Affine f, int offset) {
  return {__shfl_up_sync(kFullMask, f.a, offset), __shfl_up_sync(kFullMask, f.b, offset)};
}

template <typename T, typename MaskT>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize) gae_kernel(
    const T* __restrict__ rewards,     // [n_rows, n_steps]
    const T* __restrict__ values,      // [n_rows, n_steps]
    const MaskT* __restrict__ mask,    // [n_rows, n_steps], nonzero = valid
    float* __restrict__ advantages,    // [n_rows, n_steps] out
    float* __restrict__ returns,       // [n_rows, n_steps] out
    int64_t n_rows, int64_t n_steps, float gamma, float lam) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / kWarpSize;
  if (row >= n_rows) return;  // uniform across the warp, so the shuffles below stay full
  const int64_t base = row * n_steps;
  const float gamma_lam = gamma * lam;
  const Affine identity = {1.0f, 0.0f};
  float carry = 0.0f;  // x entering the chunk's latest step from after it
  for (int64_t hi = n_steps - 1; hi >= 0; hi -= kChunk) {
    // This lane's steps, latest first: t_k = first - k.
    const int64_t first = hi - int64_t{lane} * kItems;
    bool valid[kItems];
    float offset[kItems], value[kItems], step_b[kItems];  // r - V, V, (1 - lam) V + lam r
    Affine lane_map = identity;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = first - k;
      valid[k] = t >= 0 && is_valid(mask, base + t);
      const float r = valid[k] ? to_float(rewards[base + t]) : 0.0f;
      value[k] = valid[k] ? to_float(values[base + t]) : 0.0f;
      offset[k] = r - value[k];
      step_b[k] = (1.0f - lam) * value[k] + lam * r;
      lane_map = then(lane_map, valid[k] ? Affine{gamma_lam, step_b[k]} : identity);
    }
    // Inclusive scan over lanes (lane 0 holds the latest steps, so it is applied first).
    Affine scanned = lane_map;
#pragma unroll
    for (int width = 1; width < kWarpSize; width *= 2) {
      const Affine before = shfl_up(scanned, width);
      if (lane >= width) scanned = then(before, scanned);
    }
    const Affine entering = shfl_up(scanned, 1);
    float x = lane == 0 ? carry : entering.a * carry + entering.b;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = first - k;
      if (t < 0) break;
      const float adv = valid[k] ? offset[k] + gamma * x : 0.0f;
      advantages[base + t] = adv;
      returns[base + t] = valid[k] ? adv + value[k] : 0.0f;
      if (valid[k]) x = gamma_lam * x + step_b[k];
    }
    // Lane 31 holds the chunk's earliest steps: what leaves it enters the next chunk.
    carry = __shfl_sync(kFullMask, x, kWarpSize - 1);
  }
}

}  // namespace

cudaError_t gae(const void* rewards, const void* values, FloatType dtype, const void* mask,
                int mask_bytes, float* advantages, float* returns, int64_t n_rows,
                int64_t n_steps, float gamma, float lam, cudaStream_t stream) {
  if (n_rows == 0 || n_steps == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_mask(mask_bytes, [&](auto mask_tag) {
      using MaskT = decltype(mask_tag);
      const auto blocks = static_cast<unsigned>(ceil_div(n_rows, kWarpsPerBlock));
      gae_kernel<T, MaskT><<<blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
          static_cast<const T*>(rewards), static_cast<const T*>(values),
          static_cast<const MaskT*>(mask), advantages, returns, n_rows, n_steps, gamma, lam);
      return cudaGetLastError();
    });
  });
}

}  // namespace fusedrl
