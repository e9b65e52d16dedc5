// Torch bindings of the CPU kernels: check tensors, turn them into pointers, register the ops
// under torch.ops.fastforget_cpu. Threads come from torch's pool (torch.set_num_threads).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "unlearn_loss.h"

namespace fastforget {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ",
              cols, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || cols == 1, name, " must have contiguous rows, got strides ", t.strides());
}

at::Tensor forget_flags(const at::Tensor& is_forget, int64_t rows) {
  TORCH_CHECK(is_forget.device().is_cpu() && is_forget.dim() == 1 && is_forget.size(0) == rows,
              "is_forget must be a CPU tensor of shape (", rows, "), got ", is_forget.sizes());
  TORCH_CHECK(is_forget.scalar_type() == at::kBool || is_forget.scalar_type() == at::kByte,
              "is_forget must be bool or uint8, got ", is_forget.scalar_type());
  return is_forget.contiguous();
}

// The CPU has no caching allocator: a fresh 50 MB gradient costs a page fault per 4 KiB page, more
// than the kernel itself. Keep the storages of recent gradients and hand one out again once
// nothing else holds it (no tensor or view left on it), so steady-state training reuses warm pages.
at::Tensor grad_buffer(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  constexpr size_t kPoolSize = 4;
  static std::mutex mutex;
  static std::vector<c10::Storage> pool;
  const size_t nbytes = size_t(rows) * size_t(cols) * options.dtype().itemsize();
  auto unused = [](const c10::Storage& s) { return s.use_count() == 1; };
  const std::lock_guard<std::mutex> lock(mutex);
  for (const c10::Storage& s : pool)
    if (unused(s) && s.nbytes() == nbytes) return at::empty({0}, options).set_(s, 0, {rows, cols}, {cols, 1});
  at::Tensor fresh = at::empty({rows, cols}, options);
  if (pool.size() >= kPoolSize) {
    auto it = std::find_if(pool.begin(), pool.end(), unused);
    if (it == pool.end()) return fresh;  // all in use: do not grow past the cap
    pool.erase(it);
  }
  pool.push_back(fresh.storage());
  return fresh;
}

// Grain: enough (row, chunk) tasks per thread job that scheduling costs nothing.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(cols, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unlearn_loss_forward(
    const at::Tensor& student, const at::Tensor& retain_target, const at::Tensor& forget_target,
    const at::Tensor& is_forget, double retain_weight, double forget_weight, bool normalize_set,
    bool compute_grad) {
  TORCH_CHECK(student.dim() == 2, "student must be 2-D (rows, cols), got ", student.sizes());
  const int64_t rows = student.size(0), cols = student.size(1);
  TORCH_CHECK(rows > 0 && cols > 0, "student must have rows and columns, got ", student.sizes());
  check_rows(student, "student", rows, cols);
  check_rows(retain_target, "retain_target", rows, cols);
  check_rows(forget_target, "forget_target", rows, cols);
  TORCH_CHECK(retain_target.scalar_type() == forget_target.scalar_type(),
              "retain_target and forget_target must share a dtype, got ", retain_target.scalar_type(), " and ",
              forget_target.scalar_type());
  const at::Tensor flags = forget_flags(is_forget, rows);
  const uint8_t* forget = reinterpret_cast<const uint8_t*>(flags.data_ptr());

  int64_t n_forget = 0;
  for (int64_t b = 0; b < rows; ++b) n_forget += forget[b] != 0;
  const int64_t n_retain = rows - n_forget;
  const float w_r = float(retain_weight), w_f = float(forget_weight);

  at::Tensor grad = compute_grad ? grad_buffer(rows, cols, student.options()) : at::empty({0}, student.options());
  UnlearnLossArgs args{student.data_ptr(), student.stride(0), dtype_of(student, "student"),
                       retain_target.data_ptr(), retain_target.stride(0),
                       forget_target.data_ptr(), forget_target.stride(0), dtype_of(retain_target, "retain_target"),
                       forget, rows, cols, compute_grad ? grad.data_ptr() : nullptr,
                       grad_coef(normalize_set, n_retain, rows, cols, w_r),
                       grad_coef(normalize_set, n_forget, rows, cols, w_f)};

  const int64_t chunks = num_chunks(cols);
  std::vector<float> partial(rows * chunks);
  at::parallel_for(0, rows * chunks, grain(cols), [&](int64_t begin, int64_t end) {
    unlearn_loss_chunks(args, begin, end, partial.data());
  });

  double sum_retain = 0.0, sum_forget = 0.0;  // fixed order: deterministic
  for (int64_t b = 0; b < rows; ++b) {
    float row = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) row += partial[b * chunks + c];
    (forget[b] ? sum_forget : sum_retain) += row;
  }
  const float retain_loss = float(sum_retain / cols) * set_norm(normalize_set, n_retain, rows);
  const float forget_loss = float(sum_forget / cols) * set_norm(normalize_set, n_forget, rows);
  auto scalar = [&](float v) { return at::full({}, v, student.options().dtype(at::kFloat)); };
  return {scalar(w_r * retain_loss + w_f * forget_loss), scalar(retain_loss), scalar(forget_loss), grad};
}

float scalar_or_zero(const std::optional<at::Tensor>& t) { return t.has_value() ? t->item<float>() : 0.0f; }

void unlearn_loss_scale_grad(at::Tensor& grad, const at::Tensor& is_forget, const std::optional<at::Tensor>& grad_loss,
                             const std::optional<at::Tensor>& grad_retain,
                             const std::optional<at::Tensor>& grad_forget, double retain_weight,
                             double forget_weight) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.device().is_cpu(),
              "grad must be a contiguous 2-D CPU tensor, got ", grad.sizes());
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const at::Tensor flags = forget_flags(is_forget, rows);
  const float g = scalar_or_zero(grad_loss);
  const float scale_retain = backward_scale(g, scalar_or_zero(grad_retain), float(retain_weight));
  const float scale_forget = backward_scale(g, scalar_or_zero(grad_forget), float(forget_weight));
  if (scale_retain == 1.0f && scale_forget == 1.0f) return;
  const uint8_t* forget = reinterpret_cast<const uint8_t*>(flags.data_ptr());
  const DType dtype = dtype_of(grad, "grad");
  at::parallel_for(0, rows * num_chunks(cols), grain(cols), [&](int64_t begin, int64_t end) {
    scale_rows_chunks(grad.data_ptr(), dtype, forget, cols, scale_retain, scale_forget, begin, end);
  });
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY(fastforget_cpu, m) {
  m.def(
      "unlearn_loss_forward(Tensor student, Tensor retain_target, Tensor forget_target, Tensor is_forget, "
      "float retain_weight, float forget_weight, bool normalize_set, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "unlearn_loss_scale_grad(Tensor(a!) grad, Tensor is_forget, Tensor? grad_loss, Tensor? grad_retain, "
      "Tensor? grad_forget, float retain_weight, float forget_weight) -> ()");
}

TORCH_LIBRARY_IMPL(fastforget_cpu, CPU, m) {
  m.impl("unlearn_loss_forward", &fastforget::unlearn_loss_forward);
  m.impl("unlearn_loss_scale_grad", &fastforget::unlearn_loss_scale_grad);
}
