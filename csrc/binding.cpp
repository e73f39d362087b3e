// PyTorch binding of the fusedrl CUDA kernels: registers the ops fusedrl::cuda_* (TORCH_LIBRARY),
// checks every argument, allocates outputs, launches on the current stream, checks the launch.
//
// The schemas repeat, argument for argument, the Triton custom ops of the same name without the
// cuda_ prefix (kernels/*.py), so the Python side reuses their fake (meta) implementations and
// autograd formulas for these ops (kernels/cuda_ext.py registers them when it loads this module).
// Those Python ops live in the same namespace as torch.library FRAGMENTs, which coexist with this
// one TORCH_LIBRARY definition block; the prefix keeps the names apart.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <c10/util/accumulate.h>

#include <limits>
#include <optional>
#include <tuple>

#include "fusedrl_cuda.h"

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), "fusedrl: " #x " must be a CUDA tensor")
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), "fusedrl: " #x " must be contiguous")
#define CHECK_DEVICE(x, ref) \
  TORCH_CHECK((x).device() == (ref).device(), "fusedrl: " #x " must be on ", (ref).device())
#define CHECK_SHAPE(x, ...)                                                          \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "fusedrl: " #x " must have shape (", \
              #__VA_ARGS__, "), got ", (x).sizes())
#define CHECK_SAME_SHAPE(x, ref) \
  TORCH_CHECK((x).sizes() == (ref).sizes(), "fusedrl: " #x " must have the shape of " #ref)
#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), "fusedrl: " #x " must be ", (dtype), ", got ", (x).scalar_type())
#define CHECK_LAUNCH(status) \
  TORCH_CHECK((status) == cudaSuccess, "fusedrl: CUDA kernel launch failed: ", cudaGetErrorString(status))

namespace fusedrl {
namespace {

// A CUDA tensor that kernels can read as a flat array on `ref`'s device.
#define CHECK_INPUT(x, ref) \
  CHECK_CUDA(x);            \
  CHECK_DEVICE(x, ref);     \
  CHECK_CONTIGUOUS(x)

FloatType float_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default:
      TORCH_CHECK(false, "fusedrl: CUDA kernels take float32, bfloat16 or float16 inputs, got ",
                  x.scalar_type(), " (kernels/cuda_ext.py casts others to float32)");
  }
}

// The shared float dtype of an op's inputs.
FloatType common_float_type(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fusedrl: inputs must share one dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  return float_type(x);
}

// Masks are bool or integer; the kernels read them as unsigned integers of their width.
int mask_bytes(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool || at::isIntegralType(mask.scalar_type(), false),
              "fusedrl: mask must be bool or an integer dtype, got ", mask.scalar_type());
  return static_cast<int>(mask.element_size());
}

int label_bytes(const at::Tensor& labels) {
  TORCH_CHECK(labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong,
              "fusedrl: labels must be int32 or int64, got ", labels.scalar_type());
  return static_cast<int>(labels.element_size());
}

// grad_* of the upstream may be any float dtype and e.g. an expanded (stride 0) view.
at::Tensor as_float_rows(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_op(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index,
    bool return_entropy, bool /*inplace_backward: read by autograd only*/) {
  CHECK_CUDA(logits);
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1,
              "fusedrl: logits must be [N, V] with a contiguous last dim");
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  TORCH_CHECK(n_rows <= std::numeric_limits<int32_t>::max(), "fusedrl: too many rows");
  CHECK_INPUT(labels, logits);
  CHECK_SHAPE(labels, n_rows);
  TORCH_CHECK(temperature > 0, "fusedrl: temperature must be positive");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto rows = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n_rows}, rows), lse = at::empty({n_rows}, rows);
  at::Tensor entropy = at::empty({return_entropy ? n_rows : 0}, rows);
  CHECK_LAUNCH(token_logprobs_fwd(
      logits.data_ptr(), float_type(logits), labels.data_ptr(), label_bytes(labels),
      logp.data_ptr<float>(), return_entropy ? entropy.data_ptr<float>() : nullptr,
      lse.data_ptr<float>(), n_rows, n_cols, logits.stride(0),
      static_cast<float>(1.0 / temperature), ignore_index, c10::cuda::getCurrentCUDAStream()));
  return {logp, entropy, lse};
}

// Writes the gradient of logits into `out` (a fresh buffer, or logits itself).
void token_logprobs_bwd_into(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                             int64_t ignore_index, const at::Tensor& out) {
  CHECK_CUDA(logits);
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && out.stride(1) == 1,
              "fusedrl: logits and their gradient must be [N, V] with a contiguous last dim");
  const int64_t n_rows = logits.size(0);
  CHECK_INPUT(labels, logits);
  CHECK_INPUT(lse, logits);
  CHECK_SHAPE(labels, n_rows);
  CHECK_SHAPE(lse, n_rows);
  CHECK_DTYPE(lse, at::kFloat);
  CHECK_DEVICE(grad_logp, logits);
  const bool has_entropy_grad = grad_entropy.numel() > 0;
  at::Tensor g_logp = as_float_rows(grad_logp);
  at::Tensor g_entropy = has_entropy_grad ? as_float_rows(grad_entropy) : grad_entropy;
  CHECK_SHAPE(g_logp, n_rows);
  if (has_entropy_grad) {
    CHECK_DEVICE(g_entropy, logits);
    CHECK_SHAPE(g_entropy, n_rows);
    CHECK_INPUT(entropy, logits);
    CHECK_SHAPE(entropy, n_rows);
    CHECK_DTYPE(entropy, at::kFloat);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  CHECK_LAUNCH(token_logprobs_bwd(
      logits.data_ptr(), float_type(logits), labels.data_ptr(), label_bytes(labels),
      lse.data_ptr<float>(), has_entropy_grad ? entropy.data_ptr<float>() : nullptr,
      g_logp.data_ptr<float>(), has_entropy_grad ? g_entropy.data_ptr<float>() : nullptr,
      out.data_ptr(), n_rows, logits.size(1), logits.stride(0), out.stride(0),
      static_cast<float>(1.0 / temperature), ignore_index, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor token_logprobs_bwd_op(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                 const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, const at::Tensor& entropy,
                                 double temperature, int64_t ignore_index) {
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  token_logprobs_bwd_into(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature,
                          ignore_index, out);
  return out;
}

void token_logprobs_bwd_inplace_op(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& lse, const at::Tensor& entropy,
                                   double temperature, int64_t ignore_index) {
  token_logprobs_bwd_into(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature,
                          ignore_index, logits);
}

// The mask pointer and width for the kernels (nullptr when absent: all valid).
std::pair<const void*, int> mask_arg(const std::optional<at::Tensor>& mask, const at::Tensor& ref) {
  if (!mask.has_value()) return {nullptr, 1};
  CHECK_INPUT(*mask, ref);
  CHECK_SAME_SHAPE(*mask, ref);
  return {mask->data_ptr(), mask_bytes(*mask)};
}

void check_estimator(int64_t estimator) {
  TORCH_CHECK(estimator >= 0 && estimator <= 2, "fusedrl: estimator must be 0, 1 or 2 (k1, k2, k3)");
}

at::Tensor kl_penalty_fwd_op(const at::Tensor& logp, const at::Tensor& ref_logp,
                             const std::optional<at::Tensor>& mask, int64_t estimator) {
  CHECK_INPUT(logp, logp);
  CHECK_INPUT(ref_logp, logp);
  CHECK_SAME_SHAPE(ref_logp, logp);
  check_estimator(estimator);
  const auto [mask_ptr, mask_width] = mask_arg(mask, logp);
  const c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor out = at::empty(logp.sizes(), logp.options().dtype(at::kFloat));
  CHECK_LAUNCH(kl_penalty_fwd(logp.data_ptr(), ref_logp.data_ptr(),
                              common_float_type(logp, ref_logp), mask_ptr, mask_width,
                              out.data_ptr<float>(), logp.numel(), static_cast<int>(estimator),
                              c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor kl_penalty_bwd_op(const at::Tensor& grad_out, const at::Tensor& logp,
                             const at::Tensor& ref_logp, const std::optional<at::Tensor>& mask,
                             int64_t estimator) {
  CHECK_INPUT(logp, logp);
  CHECK_INPUT(ref_logp, logp);
  CHECK_SAME_SHAPE(ref_logp, logp);
  CHECK_DEVICE(grad_out, logp);
  CHECK_SAME_SHAPE(grad_out, logp);
  check_estimator(estimator);
  const auto [mask_ptr, mask_width] = mask_arg(mask, logp);
  const c10::cuda::CUDAGuard guard(logp.device());
  at::Tensor g = as_float_rows(grad_out);
  at::Tensor grad = at::empty_like(logp);
  CHECK_LAUNCH(kl_penalty_bwd(g.data_ptr<float>(), logp.data_ptr(), ref_logp.data_ptr(),
                              common_float_type(logp, ref_logp), mask_ptr, mask_width,
                              grad.data_ptr(), logp.numel(), static_cast<int>(estimator),
                              c10::cuda::getCurrentCUDAStream()));
  return grad;
}

std::tuple<at::Tensor, at::Tensor> gae_op(const at::Tensor& rewards, const at::Tensor& values,
                                          const at::Tensor& mask, double gamma, double lam) {
  CHECK_INPUT(rewards, rewards);
  CHECK_INPUT(values, rewards);
  CHECK_INPUT(mask, rewards);
  CHECK_SAME_SHAPE(values, rewards);
  CHECK_SAME_SHAPE(mask, rewards);
  TORCH_CHECK(rewards.dim() >= 1, "fusedrl: rewards must be [..., T]");
  TORCH_CHECK(gamma >= 0 && gamma <= 1 && lam >= 0 && lam <= 1, "fusedrl: gamma, lam in [0, 1]");
  const int64_t n_steps = rewards.size(-1);
  const int64_t n_rows = n_steps > 0 ? rewards.numel() / n_steps : 0;
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor advantages = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  at::Tensor returns = at::empty_like(advantages);
  CHECK_LAUNCH(gae(rewards.data_ptr(), values.data_ptr(), common_float_type(rewards, values),
                   mask.data_ptr(), mask_bytes(mask), advantages.data_ptr<float>(),
                   returns.data_ptr<float>(), n_rows, n_steps, static_cast<float>(gamma),
                   static_cast<float>(lam), c10::cuda::getCurrentCUDAStream()));
  return {advantages, returns};
}

// Buffers and checks shared by both losses: (loss [], grad [x.shape] or [0], stats [n_stats],
// workspace). weights [rows] fp32 comes from kernels/rl/statistics.py's row_weights.
struct LossBuffers {
  at::Tensor loss, grad, stats, workspace;
};

LossBuffers loss_buffers(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                         const at::Tensor& mask, const at::Tensor& weights, bool compute_grad,
                         int64_t n_stats) {
  CHECK_INPUT(x, x);
  CHECK_INPUT(y, x);
  CHECK_INPUT(z, x);
  CHECK_INPUT(mask, x);
  CHECK_INPUT(weights, x);
  CHECK_SAME_SHAPE(y, x);
  CHECK_SAME_SHAPE(z, x);
  CHECK_SAME_SHAPE(mask, x);
  CHECK_DTYPE(weights, at::kFloat);
  TORCH_CHECK(x.dim() >= 1, "fusedrl: loss inputs must be [..., T]");
  CHECK_SHAPE(weights, c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1));
  TORCH_CHECK(z.scalar_type() == x.scalar_type(), "fusedrl: inputs must share one dtype");
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty({}, f32), compute_grad ? at::empty(x.sizes(), f32) : at::empty({0}, f32),
          at::empty({n_stats}, f32), at::empty({ppo_workspace_floats(x.numel())}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_op(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const at::Tensor& weights, double clip_low, double clip_high,
    double dual_clip, double log_ratio_clamp, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logp.device());
  LossBuffers out = loss_buffers(logp, old_logp, advantages, mask, weights, compute_grad, 5);
  CHECK_LAUNCH(ppo_policy_loss(
      logp.data_ptr(), old_logp.data_ptr(), advantages.data_ptr(),
      common_float_type(logp, old_logp), mask.data_ptr(), mask_bytes(mask),
      weights.data_ptr<float>(), out.loss.data_ptr<float>(),
      compute_grad ? out.grad.data_ptr<float>() : nullptr, out.stats.data_ptr<float>(),
      out.workspace.data_ptr<float>(), logp.numel(), logp.size(-1), static_cast<float>(clip_low),
      static_cast<float>(clip_high), static_cast<float>(dual_clip),
      static_cast<float>(log_ratio_clamp), c10::cuda::getCurrentCUDAStream()));
  return {out.loss, out.grad, out.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_op(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const at::Tensor& mask, const at::Tensor& weights, double clip_eps, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(values.device());
  LossBuffers out = loss_buffers(values, old_values, returns, mask, weights, compute_grad, 1);
  CHECK_LAUNCH(ppo_value_loss(
      values.data_ptr(), old_values.data_ptr(), returns.data_ptr(),
      common_float_type(values, old_values), mask.data_ptr(), mask_bytes(mask),
      weights.data_ptr<float>(), out.loss.data_ptr<float>(),
      compute_grad ? out.grad.data_ptr<float>() : nullptr, out.stats.data_ptr<float>(),
      out.workspace.data_ptr<float>(), values.numel(), values.size(-1),
      static_cast<float>(clip_eps), c10::cuda::getCurrentCUDAStream()));
  return {out.loss, out.grad, out.stats};
}

}  // namespace
}  // namespace fusedrl

TORCH_LIBRARY(fusedrl, m) {
  m.def("cuda_token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool return_entropy, bool inplace_backward) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_token_logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, "
        "Tensor labels, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def("cuda_token_logprobs_bwd_inplace(Tensor grad_logp, Tensor grad_entropy, Tensor(a!) logits, "
        "Tensor labels, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> ()");
  m.def("cuda_kl_penalty_fwd(Tensor logp, Tensor ref_logp, Tensor? mask, int estimator) -> Tensor");
  m.def("cuda_kl_penalty_bwd(Tensor grad_out, Tensor logp, Tensor ref_logp, Tensor? mask, "
        "int estimator) -> Tensor");
  m.def("cuda_gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) "
        "-> (Tensor, Tensor)");
  m.def("cuda_ppo_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
        "Tensor weights, float clip_low, float clip_high, float dual_clip, float log_ratio_clamp, "
        "bool compute_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cuda_ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
        "Tensor weights, float clip_eps, bool compute_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedrl, CUDA, m) {
  m.impl("cuda_token_logprobs_fwd", &fusedrl::token_logprobs_fwd_op);
  m.impl("cuda_token_logprobs_bwd", &fusedrl::token_logprobs_bwd_op);
  m.impl("cuda_token_logprobs_bwd_inplace", &fusedrl::token_logprobs_bwd_inplace_op);
  m.impl("cuda_kl_penalty_fwd", &fusedrl::kl_penalty_fwd_op);
  m.impl("cuda_kl_penalty_bwd", &fusedrl::kl_penalty_bwd_op);
  m.impl("cuda_gae", &fusedrl::gae_op);
  m.impl("cuda_ppo_policy_loss", &fusedrl::ppo_policy_loss_op);
  m.impl("cuda_ppo_value_loss", &fusedrl::ppo_value_loss_op);
}

// `import fusedrl.kernels._C` loads this library, which runs the registrations above; the module itself
// is empty (the ops are reached through torch.ops.fusedrl).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
