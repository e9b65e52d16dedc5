// Torch bindings of the CUDA kernels: check tensors, turn them into pointers and the current
// stream, register the ops under torch.ops.fastforget_cuda.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

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

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& student) {
  TORCH_CHECK(t.is_cuda() && t.device() == student.device(), name, " must be on ", student.device(), ", got ",
              t.device());
  TORCH_CHECK(t.dim() == 2 && t.sizes() == student.sizes(), name, " must have shape ", student.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) == 1, name, " must have contiguous rows, got strides ", t.strides());
}

const uint8_t* forget_flags(const at::Tensor& is_forget, const at::Tensor& like) {
  TORCH_CHECK(is_forget.device() == like.device() && is_forget.dim() == 1 && is_forget.size(0) == like.size(0) &&
                  is_forget.is_contiguous(),
              "is_forget must be a contiguous (", like.size(0), ",) tensor on ", like.device(), ", got ",
              is_forget.sizes(), " on ", is_forget.device());
  TORCH_CHECK(is_forget.scalar_type() == at::kBool || is_forget.scalar_type() == at::kByte,
              "is_forget must be bool or uint8, got ", is_forget.scalar_type());
  return reinterpret_cast<const uint8_t*>(is_forget.data_ptr());
}

const float* scalar_ptr(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == like.device(), name,
              " must be a float32 scalar on ", like.device());
  return t->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unlearn_loss_forward(
    const at::Tensor& student, const at::Tensor& retain_target, const at::Tensor& forget_target,
    const at::Tensor& is_forget, double retain_weight, double forget_weight, bool normalize_set,
    bool compute_grad) {
  TORCH_CHECK(student.is_cuda() && student.dim() == 2 && student.numel() > 0,
              "student must be a non-empty 2-D CUDA tensor, got ", student.sizes(), " on ", student.device());
  check_rows(student, "student", student);
  check_rows(retain_target, "retain_target", student);
  check_rows(forget_target, "forget_target", student);
  TORCH_CHECK(retain_target.scalar_type() == forget_target.scalar_type(),
              "retain_target and forget_target must share a dtype, got ", retain_target.scalar_type(), " and ",
              forget_target.scalar_type());
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t rows = student.size(0), cols = student.size(1);
  at::Tensor grad = compute_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor scratch = at::empty({unlearn_loss_scratch_floats(rows, cols)}, f32);
  at::Tensor count = at::empty({1}, student.options().dtype(at::kInt));
  at::Tensor loss = at::empty({}, f32), retain_loss = at::empty({}, f32), forget_loss = at::empty({}, f32);
  const CudaLossArgs args{student.data_ptr(), student.stride(0), dtype_of(student, "student"),
                          retain_target.data_ptr(), retain_target.stride(0),
                          forget_target.data_ptr(), forget_target.stride(0), dtype_of(retain_target, "retain_target"),
                          forget_flags(is_forget, student), rows, cols, compute_grad ? grad.data_ptr() : nullptr,
                          float(retain_weight), float(forget_weight), normalize_set};
  C10_CUDA_CHECK(launch_unlearn_loss_forward(args, scratch.data_ptr<float>(), count.data_ptr<int>(), loss.data_ptr<float>(),
                                      retain_loss.data_ptr<float>(), forget_loss.data_ptr<float>(),
                                      at::cuda::getCurrentCUDAStream()));
  return {loss, retain_loss, forget_loss, grad};
}

void unlearn_loss_scale_grad(at::Tensor& grad, const at::Tensor& is_forget, const std::optional<at::Tensor>& grad_loss,
                             const std::optional<at::Tensor>& grad_retain,
                             const std::optional<at::Tensor>& grad_forget, double retain_weight,
                             double forget_weight) {
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.is_contiguous(), "grad must be a contiguous 2-D CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad.device());
  C10_CUDA_CHECK(launch_unlearn_loss_scale_grad(
      grad.data_ptr(), dtype_of(grad, "grad"), forget_flags(is_forget, grad), grad.size(0), grad.size(1),
      scalar_ptr(grad_loss, "grad_loss", grad), scalar_ptr(grad_retain, "grad_retain", grad),
      scalar_ptr(grad_forget, "grad_forget", grad), float(retain_weight), float(forget_weight),
      at::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY(fastforget_cuda, m) {
  m.def(
      "unlearn_loss_forward(Tensor student, Tensor retain_target, Tensor forget_target, Tensor is_forget, "
      "float retain_weight, float forget_weight, bool normalize_set, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "unlearn_loss_scale_grad(Tensor(a!) grad, Tensor is_forget, Tensor? grad_loss, Tensor? grad_retain, "
      "Tensor? grad_forget, float retain_weight, float forget_weight) -> ()");
}

TORCH_LIBRARY_IMPL(fastforget_cuda, CUDA, m) {
  m.impl("unlearn_loss_forward", &fastforget::unlearn_loss_forward);
  m.impl("unlearn_loss_scale_grad", &fastforget::unlearn_loss_scale_grad);
}
