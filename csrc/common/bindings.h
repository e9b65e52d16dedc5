// What both extensions' bindings share: op schemas, tensor checks, and tensors -> kernel args.
// Included by bindings.cpp files only (it needs torch); kernels stay torch-free.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "patch_embed.h"
#include "teacher_batch.h"
#include "unlearn_loss.h"

namespace fastforget {

// The loss over a list of feature tensors (one table: any number in one pass), each (rows, cols_i).
constexpr const char* kUnlearnLossForwardSchema =
    "unlearn_loss_forward(Tensor[] students, Tensor[] retain_targets, Tensor[] forget_targets, Tensor is_forget, "
    "float retain_weight, float forget_weight, int normalize, bool compute_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor[])";
constexpr const char* kUnlearnLossScaleGradSchema =
    "unlearn_loss_scale_grad(Tensor(a!)[] grads, Tensor is_forget, Tensor? grad_loss, Tensor? grad_retain, "
    "Tensor? grad_forget, float retain_weight, float forget_weight) -> ()";
constexpr const char* kTeacherBatchSchema =
    "make_teacher_batch(Tensor images, Tensor is_forget, Tensor stream, int noise, float? clamp_lo, "
    "float? clamp_hi) -> Tensor";

constexpr const char* kMaskedPatchEmbedSchema =
    "masked_patch_embed(Tensor images, Tensor weight, Tensor? bias, Tensor pos_embed, Tensor ids_keep, "
    "Tensor? cls_token) -> Tensor";

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline const uint8_t* forget_flags(const at::Tensor& is_forget, const at::Tensor& like) {
  TORCH_CHECK(is_forget.device() == like.device() && is_forget.dim() == 1 && is_forget.size(0) == like.size(0) &&
                  is_forget.is_contiguous(),
              "is_forget must be a contiguous (", like.size(0), ",) tensor on ", like.device(), ", got ",
              is_forget.sizes(), " on ", is_forget.device());
  TORCH_CHECK(is_forget.scalar_type() == at::kBool || is_forget.scalar_type() == at::kByte,
              "is_forget must be bool or uint8, got ", is_forget.scalar_type());
  return reinterpret_cast<const uint8_t*>(is_forget.data_ptr());
}

// Checks one tensor of the forward's table (2-D rows with unit column stride, on one device,
// `rows` rows) and points its kernel arguments at it; grad is filled in by the caller.
inline UnlearnLossArgs unlearn_loss_args(const at::Tensor& student, const at::Tensor& retain,
                                         const at::Tensor& forget, const uint8_t* is_forget, int64_t rows,
                                         double retain_weight, double forget_weight, int64_t normalize) {
  TORCH_CHECK(student.dim() == 2 && student.numel() > 0 && student.size(0) == rows,
              "students must be non-empty 2-D tensors of ", rows, " rows, got ", student.sizes());
  for (const auto& [t, name] : {std::pair{&student, "student"}, {&retain, "retain_target"}, {&forget, "forget_target"}}) {
    TORCH_CHECK(t->device() == student.device(), name, " must be on ", student.device(), ", got ", t->device());
    TORCH_CHECK(t->sizes() == student.sizes(), name, " must have shape ", student.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->stride(1) == 1 || t->size(1) == 1, name, " must have contiguous rows, got strides ", t->strides());
  }
  TORCH_CHECK(retain.scalar_type() == forget.scalar_type(), "retain_target and forget_target must share a dtype, got ",
              retain.scalar_type(), " and ", forget.scalar_type());
  TORCH_CHECK(normalize >= kSet && normalize <= kBatch, "normalize must be 0 (set), 1 (reference) or 2 (batch), got ",
              normalize);
  return UnlearnLossArgs{student.data_ptr(), student.stride(0), dtype_of(student, "student"),
                         retain.data_ptr(), retain.stride(0),
                         forget.data_ptr(), forget.stride(0), dtype_of(retain, "retain_target"),
                         is_forget, student.size(0), student.size(1), nullptr,
                         float(retain_weight), float(forget_weight), int32_t(normalize)};
}

// The table of a list of tensors: checked, each with its gradient buffer from make_grad(rows,
// cols, options) when compute_grad (appended to grads).
template <typename MakeGrad>
std::vector<UnlearnLossArgs> unlearn_loss_table(at::TensorList students, at::TensorList retains,
                                                at::TensorList forgets, const at::Tensor& is_forget,
                                                double retain_weight, double forget_weight, int64_t normalize,
                                                bool compute_grad, std::vector<at::Tensor>& grads,
                                                MakeGrad&& make_grad) {
  TORCH_CHECK(!students.empty() && retains.size() == students.size() && forgets.size() == students.size(),
              "students, retain_targets and forget_targets must be lists of one length >= 1, got ", students.size(),
              ", ", retains.size(), " and ", forgets.size());
  const uint8_t* flags = forget_flags(is_forget, students[0]);
  std::vector<UnlearnLossArgs> table;
  for (size_t i = 0; i < students.size(); ++i) {
    table.push_back(unlearn_loss_args(students[i], retains[i], forgets[i], flags, students[0].size(0),
                                      retain_weight, forget_weight, normalize));
    if (compute_grad) {
      grads.push_back(make_grad(students[i].size(0), students[i].size(1), students[i].options()));
      table.back().grad = grads.back().data_ptr();
    }
  }
  return table;
}

// Checks the teacher batch's inputs ((rows, ...) contiguous images, the noise stream (seed, first
// element) as two int64 on the same device) and allocates its output.
inline TeacherBatchArgs teacher_batch_args(const at::Tensor& images, const at::Tensor& is_forget,
                                           const at::Tensor& stream, int64_t noise, std::optional<double> clamp_lo,
                                           std::optional<double> clamp_hi, at::Tensor& out) {
  TORCH_CHECK(images.dim() >= 1 && images.numel() > 0 && images.is_contiguous(),
              "images must be a non-empty contiguous tensor, got ", images.sizes());
  TORCH_CHECK(stream.numel() == 2 && stream.is_contiguous() && stream.scalar_type() == at::kLong &&
                  stream.device() == images.device(),
              "stream must be two int64 (seed, first element) on ", images.device());
  TORCH_CHECK(noise >= 0 && noise <= 2, "noise must be 0 (normal), 1 (uniform) or 2 (constant), got ", noise);
  TORCH_CHECK(clamp_lo.has_value() == clamp_hi.has_value(), "clamp_lo and clamp_hi must be given together");
  out = at::empty_like(images);
  return TeacherBatchArgs{images.data_ptr(), out.data_ptr(), dtype_of(images, "images"),
                          forget_flags(is_forget, images), images.size(0), images.numel() / images.size(0),
                          stream.data_ptr<int64_t>(), Noise(noise), clamp_lo.has_value(),
                          float(clamp_lo.value_or(0.0)), float(clamp_hi.value_or(1.0))};
}

// The masked-patch encoding, given how this device gathers: checks the inputs (contiguous images
// (B, C, H, W), weight (D, C, p, p), pos (1, 1 + L, D), ids (B, K) int64; bias and cls optional,
// parameters of one dtype), gathers the kept patches with their epilogue rows, then one GEMM
// accumulates patches @ weight^T onto those rows. Returns (B, tokens, D).
template <typename Gather>
at::Tensor masked_patch_embed_with(const at::Tensor& images, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& pos,
                                   const at::Tensor& ids_keep, const std::optional<at::Tensor>& cls, Gather&& gather) {
  TORCH_CHECK(images.dim() == 4 && images.is_contiguous(), "images must be contiguous (B, C, H, W), got ",
              images.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() && weight.size(1) == images.size(1) &&
                  weight.size(2) == weight.size(3),
              "weight must be contiguous (D, C, p, p) with C = ", images.size(1), ", got ", weight.sizes());
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t D = weight.size(0), p = weight.size(2);
  TORCH_CHECK(H % p == 0 && W % p == 0, "images' height and width must be multiples of ", p);
  const int64_t L = (H / p) * (W / p);
  TORCH_CHECK(pos.is_contiguous() && pos.numel() == (1 + L) * D, "pos_embed must be contiguous (1, ", 1 + L, ", ",
              D, "), got ", pos.sizes());
  TORCH_CHECK(ids_keep.dim() == 2 && ids_keep.size(0) == B && ids_keep.scalar_type() == at::kLong &&
                  ids_keep.is_contiguous(),
              "ids_keep must be contiguous int64 (", B, ", K), got ", ids_keep.sizes());
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, {&pos, "pos_embed"}, {&ids_keep, "ids_keep"}})
    TORCH_CHECK(t->device() == images.device(), name, " must be on ", images.device());
  for (const auto& [t, name] : {std::pair{&bias, "bias"}, {&cls, "cls_token"}})
    if (t->has_value())
      TORCH_CHECK((*t)->is_contiguous() && (*t)->numel() == D && (*t)->scalar_type() == weight.scalar_type() &&
                      (*t)->device() == images.device(),
                  name, " must be a contiguous tensor of ", D, " ", weight.scalar_type(), " on ", images.device());
  TORCH_CHECK(pos.scalar_type() == weight.scalar_type(), "pos_embed must be ", weight.scalar_type());
  const int64_t K = ids_keep.size(1), tokens = K + cls.has_value();
  at::Tensor patches = at::empty({B * tokens, C * p * p}, weight.options());
  at::Tensor out = at::empty({B, tokens, D}, weight.options());
  const PatchEmbedArgs args{images.data_ptr(), dtype_of(images, "images"), ids_keep.data_ptr<int64_t>(),
                            bias.has_value() ? bias->data_ptr() : nullptr, pos.data_ptr(),
                            cls.has_value() ? cls->data_ptr() : nullptr, dtype_of(weight, "weight"),
                            patches.data_ptr(), out.data_ptr(), B, C, H, W, p, K, D};
  gather(args);
  out.view({B * tokens, D}).addmm_(patches, weight.view({D, C * p * p}).t());
  return out;
}

}  // namespace fastforget
