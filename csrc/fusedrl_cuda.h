// Host launchers of the fusedrl CUDA kernels: plain pointers, sizes and a stream; no PyTorch.
//
// The binding (binding.cpp) validates every argument; these functions trust them. Each returns
// the launch status (cudaGetLastError), which the binding turns into an error; [[nodiscard]] makes
// ignoring it a compile error under -Werror.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fusedrl {

// Element type of the floating-point inputs (one per op; the Python side casts mixed inputs).
enum class FloatType { kFloat32, kBFloat16, kFloat16 };

// token_logprobs forward. logits [n_rows, n_cols] (row stride in elements, last dim contiguous),
// labels [n_rows] of label_bytes (4 or 8) -> logp, lse [n_rows] fp32 and, if entropy != nullptr,
// entropy [n_rows] fp32. Rows whose label is ignore_index are written as 0 and never read.
[[nodiscard]] cudaError_t token_logprobs_fwd(const void* logits, FloatType dtype, const void* labels,
                               int label_bytes, float* logp, float* entropy, float* lse,
                               int64_t n_rows, int64_t n_cols, int64_t row_stride,
                               float inv_temperature, int64_t ignore_index, cudaStream_t stream);

// token_logprobs backward: grad_logits [n_rows, n_cols] (logits' dtype, its own row stride; may
// alias logits) from the fp32 upstream gradients grad_logp and, if grad_entropy != nullptr,
// grad_entropy (then entropy, from forward, is read too).
[[nodiscard]] cudaError_t token_logprobs_bwd(const void* logits, FloatType dtype, const void* labels,
                               int label_bytes, const float* lse, const float* entropy,
                               const float* grad_logp, const float* grad_entropy,
                               void* grad_logits, int64_t n_rows, int64_t n_cols,
                               int64_t row_stride, int64_t grad_row_stride,
                               float inv_temperature, int64_t ignore_index, cudaStream_t stream);

// kl_penalty: estimator 0, 1, 2 = k1, k2, k3. mask (nonzero = valid, mask_bytes 1/2/4/8) may be
// nullptr. Forward writes kl [n] fp32; backward writes d kl / d logp [n] in the inputs' dtype.
[[nodiscard]] cudaError_t kl_penalty_fwd(const void* logp, const void* ref_logp, FloatType dtype,
                           const void* mask, int mask_bytes, float* out, int64_t n,
                           int estimator, cudaStream_t stream);
[[nodiscard]] cudaError_t kl_penalty_bwd(const float* grad_out, const void* logp, const void* ref_logp,
                           FloatType dtype, const void* mask, int mask_bytes, void* grad_logp,
                           int64_t n, int estimator, cudaStream_t stream);

// gae over rows of n_steps: rewards, values [n_rows, n_steps], mask as above (required) ->
// advantages, returns [n_rows, n_steps] fp32.
[[nodiscard]] cudaError_t gae(const void* rewards, const void* values, FloatType dtype, const void* mask,
                int mask_bytes, float* advantages, float* returns, int64_t n_rows,
                int64_t n_steps, float gamma, float lam, cudaStream_t stream);

// PPO losses over n = n_rows * n_steps tokens. weights [n_rows] fp32 is each row's aggregation
// weight. Writes loss [] fp32, grad [n] fp32 (if grad != nullptr) and stats: policy [5] =
// clipfrac, dual_clipfrac, approx_kl, ratio_mean, ratio_max; value [1] = vf_clipfrac.
// workspace holds ppo_workspace_floats(n) floats (per-block partial sums, reduced in a fixed
// order so the result is deterministic).
[[nodiscard]] int64_t ppo_workspace_floats(int64_t n);
[[nodiscard]] cudaError_t ppo_policy_loss(const void* logp, const void* old_logp, const void* advantages,
                            FloatType dtype, const void* mask, int mask_bytes,
                            const float* weights, float* loss, float* grad, float* stats,
                            float* workspace, int64_t n, int64_t n_steps, float clip_low,
                            float clip_high, float dual_clip, float log_ratio_clamp,
                            cudaStream_t stream);
[[nodiscard]] cudaError_t ppo_value_loss(const void* values, const void* old_values, const void* returns,
                           FloatType dtype, const void* mask, int mask_bytes,
                           const float* weights, float* loss, float* grad, float* stats,
                           float* workspace, int64_t n, int64_t n_steps, float clip_eps,
                           cudaStream_t stream);

}  // namespace fusedrl
