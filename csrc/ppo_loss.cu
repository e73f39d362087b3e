// PPO's clipped policy and value losses, forward and backward in one pass (kernels/rl/ppo_loss.py).
//
// Per token: the loss term and its derivative, both times the row's aggregation weight, and the
// diagnostics. Each block of kBlockTokens tokens writes one row of partial sums to a workspace;
// a one-block kernel then reduces them in a fixed order (deterministic, no atomics) into the loss
// and the stats. Backward is the upstream scalar times the stored derivative (done in PyTorch).
#include "common.cuh"

namespace fusedrl {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;                         // tokens per thread
constexpr int kBlockTokens = kThreads * kItems;   // tokens per block, as BLOCK in ppo_loss.py
// Workspace columns per block: sums of loss * w, valid, clipped, dual-clipped, k3 KL, ratio; then
// the max ratio over valid tokens (0 if none: a ratio is positive).
enum Partial { kLoss, kCount, kClipped, kDualClipped, kKl, kRatioSum, kRatioMax, kNumPartials };

struct TokenTerms {
  float loss, grad, kl, ratio;
  bool clipped, dual_clipped;
};

// max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), bounded by -A * dual_clip for A < 0 when
// dual_clip > 0, the log-ratio clamped to +-log_ratio_clamp before exp(). Where a clipped branch
// wins, or the log-ratio is clamped, the loss is flat in logp: gradient 0.
struct PolicyTerm {
  float clip_low, clip_high, dual_clip, log_ratio_clamp;

  __device__ TokenTerms operator()(float logp, float old_logp, float adv) const {
    const float raw_log_ratio = logp - old_logp;
    const float log_ratio = fminf(fmaxf(raw_log_ratio, -log_ratio_clamp), log_ratio_clamp);
    const float ratio = expf(log_ratio);
    const float unclipped = -adv * ratio;
    const float clipped = -adv * fminf(fmaxf(ratio, 1.0f - clip_low), 1.0f + clip_high);
    TokenTerms out;
    out.clipped = clipped > unclipped;
    out.loss = fmaxf(unclipped, clipped);
    // d(-A r)/d logp = -A r
    out.grad = (out.clipped || raw_log_ratio != log_ratio) ? 0.0f : unclipped;
    const float bound = -adv * dual_clip;
    out.dual_clipped = dual_clip > 0.0f && adv < 0.0f && bound < out.loss;
    if (out.dual_clipped) {
      out.loss = bound;
      out.grad = 0.0f;
    }
    out.kl = ratio - 1.0f - log_ratio;  // k3 estimate of KL(old || new)
    out.ratio = ratio;
    return out;
  }
};

// 0.5 * max((v - R)^2, (clip(v, v_old +- clip_eps) - R)^2), clipping only if clip_eps >= 0. The
// clipped term can only win outside the clip range, where it is flat in v: gradient 0.
struct ValueTerm {
  float clip_eps;

  __device__ TokenTerms operator()(float value, float old_value, float ret) const {
    const float error = value - ret;
    TokenTerms out = {0.5f * error * error, error, 0.0f, 0.0f, false, false};
    if (clip_eps >= 0.0f) {
      const float clipped_error =
          fminf(fmaxf(value, old_value - clip_eps), old_value + clip_eps) - ret;
      const float clipped_loss = 0.5f * clipped_error * clipped_error;
      out.clipped = clipped_loss > out.loss;
      if (out.clipped) {
        out.loss = clipped_loss;
        out.grad = 0.0f;
      }
    }
    return out;
  }
};

template <typename T, typename MaskT, typename Term>
__global__ void __launch_bounds__(kThreads) ppo_token_kernel(
    const T* __restrict__ x,              // [n] logp or values
    const T* __restrict__ y,              // [n] old_logp or old_values
    const T* __restrict__ z,              // [n] advantages or returns
    const MaskT* __restrict__ mask,       // [n] nonzero = valid
    const float* __restrict__ weights,    // [n / n_steps] aggregation weight of each row
    float* __restrict__ grad,             // [n] out: d loss / d x (nullptr: not wanted)
    float* __restrict__ partials,         // [gridDim.x, kNumPartials] out
    int64_t n, int64_t n_steps, Term term) {
  __shared__ float scratch[kThreads / kWarpSize];
  float sums[kRatioMax] = {};
  float ratio_max = 0.0f;
  const int64_t block_start = blockIdx.x * int64_t{kBlockTokens};
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = block_start + k * kThreads + threadIdx.x;  // coalesced across the block
    if (i >= n) break;
    if (!is_valid(mask, i)) {  // masked entries are never read
      if (grad != nullptr) grad[i] = 0.0f;
      continue;
    }
    const float w = weights[i / n_steps];
    const TokenTerms t = term(to_float(x[i]), to_float(y[i]), to_float(z[i]));
    if (grad != nullptr) grad[i] = t.grad * w;
    sums[kLoss] += t.loss * w;
    sums[kCount] += 1.0f;
    sums[kClipped] += t.clipped ? 1.0f : 0.0f;
    sums[kDualClipped] += t.dual_clipped ? 1.0f : 0.0f;
    sums[kKl] += t.kl;
    sums[kRatioSum] += t.ratio;
    ratio_max = fmaxf(ratio_max, t.ratio);
  }
  float* out = partials + blockIdx.x * int64_t{kNumPartials};
#pragma unroll
  for (int j = 0; j < kRatioMax; ++j) {
    const float total = block_sum<kThreads>(sums[j], scratch);
    if (threadIdx.x == 0) out[j] = total;
  }
  const float block_ratio_max = block_max<kThreads>(ratio_max, scratch);
  if (threadIdx.x == 0) out[kRatioMax] = block_ratio_max;
}

// Reduces the partials of n_blocks blocks in a fixed order. Writes loss [] and n_stats stats:
// the clipped, dual-clipped, KL and ratio sums as means over valid tokens, then the max ratio.
__global__ void __launch_bounds__(kThreads) ppo_finalize_kernel(
    const float* __restrict__ partials, int64_t n_blocks, float* __restrict__ loss,
    float* __restrict__ stats, int n_stats) {
  __shared__ float scratch[kThreads / kWarpSize];
  __shared__ float totals[kNumPartials];
  for (int j = 0; j < kNumPartials; ++j) {
    float acc = 0.0f;  // the identity of both the sum and the max of positive ratios
    for (int64_t b = threadIdx.x; b < n_blocks; b += kThreads) {
      const float p = partials[b * kNumPartials + j];
      acc = j == kRatioMax ? fmaxf(acc, p) : acc + p;
    }
    const float total = j == kRatioMax ? block_max<kThreads>(acc, scratch)
                                       : block_sum<kThreads>(acc, scratch);
    if (threadIdx.x == 0) totals[j] = total;
  }
  if (threadIdx.x == 0) {
    loss[0] = totals[kLoss];
    const float count = fmaxf(totals[kCount], 1.0f);
    for (int s = 0; s < n_stats; ++s) {
      stats[s] = kClipped + s == kRatioMax ? totals[kRatioMax] : totals[kClipped + s] / count;
    }
  }
}

int64_t token_blocks(int64_t n) { return n > 0 ? ceil_div(n, kBlockTokens) : 1; }

template <typename Term>
cudaError_t launch_loss(const void* x, const void* y, const void* z, FloatType dtype,
                        const void* mask, int mask_bytes, const float* weights, float* loss,
                        float* grad, float* stats, int n_stats, float* workspace, int64_t n,
                        int64_t n_steps, Term term, cudaStream_t stream) {
  const int64_t blocks = token_blocks(n);
  const cudaError_t status = dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_mask(mask_bytes, [&](auto mask_tag) {
      using MaskT = decltype(mask_tag);
      ppo_token_kernel<T, MaskT, Term><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const T*>(z),
          static_cast<const MaskT*>(mask), weights, grad, workspace, n, n_steps, term);
      return cudaGetLastError();
    });
  });
  if (status != cudaSuccess) return status;
  ppo_finalize_kernel<<<1, kThreads, 0, stream>>>(workspace, blocks, loss, stats, n_stats);
  return cudaGetLastError();
}

}  // namespace

int64_t ppo_workspace_floats(int64_t n) { return token_blocks(n) * kNumPartials; }

cudaError_t ppo_policy_loss(const void* logp, const void* old_logp, const void* advantages,
                            FloatType dtype, const void* mask, int mask_bytes,
                            const float* weights, float* loss, float* grad, float* stats,
                            float* workspace, int64_t n, int64_t n_steps, float clip_low,
                            float clip_high, float dual_clip, float log_ratio_clamp,
                            cudaStream_t stream) {
  return launch_loss(logp, old_logp, advantages, dtype, mask, mask_bytes, weights, loss, grad,
                     stats, 5, workspace, n, n_steps,
                     PolicyTerm{clip_low, clip_high, dual_clip, log_ratio_clamp}, stream);
}

cudaError_t ppo_value_loss(const void* values, const void* old_values, const void* returns,
                           FloatType dtype, const void* mask, int mask_bytes,
                           const float* weights, float* loss, float* grad, float* stats,
                           float* workspace, int64_t n, int64_t n_steps, float clip_eps,
                           cudaStream_t stream) {
  return launch_loss(values, old_values, returns, dtype, mask, mask_bytes, weights, loss, grad,
                     stats, 1, workspace, n, n_steps, ValueTerm{clip_eps}, stream);
}

}  // namespace fusedrl
