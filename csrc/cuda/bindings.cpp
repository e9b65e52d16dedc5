// Torch bindings of the CUDA kernels: check tensors, turn them into pointers and the current
// stream, register the ops under torch.ops.fastforget_cuda.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "../common/autograd.h"
#include "../common/bindings.h"
#include "diffusion_inputs.h"
#include "group_norm.h"
#include "patch_embed.h"
#include "token_embed.h"
#include "teacher_batch.h"
#include "unlearn_loss.h"
#include "vq_quantize.h"

namespace fastforget {
namespace {

const float* scalar_ptr(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == like.device(), name,
              " must be a float32 scalar on ", like.device());
  return t->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> unlearn_loss_forward(
    at::TensorList students, at::TensorList retain_targets, at::TensorList forget_targets,
    const at::Tensor& is_forget, double retain_weight, double forget_weight, int64_t normalize, bool compute_grad) {
  TORCH_CHECK(!students.empty() && students[0].is_cuda(), "students must be CUDA tensors");
  TORCH_CHECK(int64_t(students.size()) <= kMaxLossTensors, "the cuda kernel takes up to ", kMaxLossTensors,
              " tensors, got ", students.size());
  const c10::cuda::CUDAGuard guard(students[0].device());
  std::vector<at::Tensor> grads;
  const std::vector<UnlearnLossArgs> table = unlearn_loss_table(
      students, retain_targets, forget_targets, is_forget, retain_weight, forget_weight, normalize, compute_grad,
      grads, [](int64_t rows, int64_t cols, const at::TensorOptions& o) { return at::empty({rows, cols}, o); });
  for (const UnlearnLossArgs& a : table)
    TORCH_CHECK(a.student_dtype == table[0].student_dtype && a.target_dtype == table[0].target_dtype,
                "the cuda kernel takes tensors of one student dtype and one target dtype");
  const auto f32 = students[0].options().dtype(at::kFloat);
  at::Tensor scratch = at::empty({unlearn_loss_scratch_floats(table.data(), int(table.size()))}, f32);
  at::Tensor count = at::empty({1}, students[0].options().dtype(at::kInt));
  at::Tensor loss = at::empty({}, f32), retain_loss = at::empty({}, f32), forget_loss = at::empty({}, f32);
  C10_CUDA_CHECK(launch_unlearn_loss_forward(table.data(), int(table.size()), scratch.data_ptr<float>(),
                                             count.data_ptr<int>(), loss.data_ptr<float>(),
                                             retain_loss.data_ptr<float>(), forget_loss.data_ptr<float>(),
                                             at::cuda::getCurrentCUDAStream()));
  return {loss, retain_loss, forget_loss, grads};
}

void unlearn_loss_scale_grad(at::TensorList grads, const at::Tensor& is_forget,
                             const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_retain,
                             const std::optional<at::Tensor>& grad_forget, double retain_weight,
                             double forget_weight) {
  if (grads.empty()) return;
  TORCH_CHECK(int64_t(grads.size()) <= kMaxLossTensors, "the cuda kernel takes up to ", kMaxLossTensors, " tensors");
  std::vector<void*> pointers;
  std::vector<int64_t> cols;
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.is_cuda() && g.dim() == 2 && g.is_contiguous() && g.size(0) == grads[0].size(0) &&
                    g.scalar_type() == grads[0].scalar_type() && g.device() == grads[0].device(),
                "grads must be contiguous 2-D CUDA tensors of one dtype and row count");
    pointers.push_back(g.data_ptr());
    cols.push_back(g.size(1));
  }
  const at::Tensor& g0 = grads[0];
  const c10::cuda::CUDAGuard guard(g0.device());
  C10_CUDA_CHECK(launch_unlearn_loss_scale_grad(
      pointers.data(), cols.data(), int(grads.size()), dtype_of(g0, "grad"), forget_flags(is_forget, g0), g0.size(0),
      scalar_ptr(grad_loss, "grad_loss", g0), scalar_ptr(grad_retain, "grad_retain", g0),
      scalar_ptr(grad_forget, "grad_forget", g0), float(retain_weight), float(forget_weight),
      at::cuda::getCurrentCUDAStream()));
}

at::Tensor make_teacher_batch(const at::Tensor& images, const at::Tensor& is_forget, const at::Tensor& stream,
                              int64_t noise, std::optional<double> clamp_lo, std::optional<double> clamp_hi) {
  TORCH_CHECK(images.is_cuda(), "images must be a CUDA tensor, got ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor out;
  const TeacherBatchArgs args = teacher_batch_args(images, is_forget, stream, noise, clamp_lo, clamp_hi, out);
  at::Tensor scratch = at::empty({teacher_batch_scratch_bytes(images.numel())}, images.options().dtype(at::kByte));
  C10_CUDA_CHECK(launch_teacher_batch(args, scratch.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor masked_patch_embed(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& pos, const at::Tensor& ids_keep,
                              const std::optional<at::Tensor>& cls) {
  TORCH_CHECK(images.is_cuda(), "images must be a CUDA tensor, got ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  return masked_patch_embed_with(images, weight, bias, pos, ids_keep, cls, [](const PatchEmbedArgs& args) {
    C10_CUDA_CHECK(launch_gather_patches(args, at::cuda::getCurrentCUDAStream()));
  });
}

std::tuple<at::Tensor, at::Tensor> make_diffusion_inputs(const at::Tensor& y_0, const at::Tensor& y_cond,
                                                         const at::Tensor& mask, const at::Tensor& gammas,
                                                         const at::Tensor& is_forget, const at::Tensor& noise,
                                                         const at::Tensor& stream, bool given) {
  TORCH_CHECK(y_0.is_cuda(), "y_0 must be a CUDA tensor, got ", y_0.device());
  TORCH_CHECK(y_0.size(0) <= 65535, "the cuda kernel takes up to 65535 images, got ", y_0.size(0));
  const c10::cuda::CUDAGuard guard(y_0.device());
  at::Tensor student, teacher;
  const DiffusionInputsArgs args = diffusion_inputs_args(y_0, y_cond, mask, gammas, is_forget, noise, stream, given,
                                                         student, teacher);
  C10_CUDA_CHECK(launch_diffusion_inputs(args, at::cuda::getCurrentCUDAStream()));
  return {student, teacher};
}

// The kernels read parameters and FiLM as float32: the few values in another dtype are converted.
std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional(t->to(at::kFloat)) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t groups, double eps,
    bool silu) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = as_float(weight), b = as_float(bias), sc = as_float(scale), sh = as_float(shift);
  const at::Tensor xd = x.contiguous();  // TODO(gpu): channels-last kernels; for now a copy each way
  GroupNormArgs args = group_norm_args(xd, w, b, sc, sh, groups, eps, silu, false);
  auto [y, mean, rstd] = group_norm_outputs(args, xd);
  C10_CUDA_CHECK(launch_group_norm_forward(args, at::cuda::getCurrentCUDAStream()));
  return {is_channels_last(x) ? y.contiguous(at::MemoryFormat::ChannelsLast) : y, mean, rstd};
}

std::vector<at::Tensor> group_norm_silu_backward(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    bool silu) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = as_float(weight), b = as_float(bias), sc = as_float(scale), sh = as_float(shift);
  const at::Tensor xd = x.contiguous(), gd = grad.contiguous();
  GroupNormArgs args = group_norm_args(xd, w, b, sc, sh, groups, 0.0, silu, false);
  auto [dx, sums] = group_norm_backward_buffers(args, gd, xd, mean, rstd);
  C10_CUDA_CHECK(launch_group_norm_backward(args, at::cuda::getCurrentCUDAStream()));
  return group_norm_grads(is_channels_last(x) ? dx.contiguous(at::MemoryFormat::ChannelsLast) : dx, sums, weight,
                          bias, scale, shift);
}

at::Tensor vq_quantize(const at::Tensor& z_in, const at::Tensor& codebook_in) {
  TORCH_CHECK(z_in.is_cuda(), "z must be a CUDA tensor, got ", z_in.device());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(), codebook = codebook_in.contiguous();
  at::Tensor indices;
  const VqQuantizeArgs args = vq_quantize_args(z, codebook, indices);
  at::Tensor norms = at::empty({args.codes}, z.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_vq_quantize(args, norms.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return indices;
}

// MAGE's token embedding: forward a row per thread group. Backward, deterministic with no atomics
// and no host synchronisation: each row's dx (float32) and keys; one stable sort of the keys and
// searchsorted (device ops of fixed shapes) give each word and position row its sources, in row
// order; the segment-sum kernel adds them in a fixed order and writes the weights' dtype. The
// LayerNorm parameters' gradients come from the blocks' partial sums, added in block order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_embed_forward(
    const at::Tensor& tokens, const at::Tensor& keep, const at::Tensor& masked, const at::Tensor& word,
    const at::Tensor& pos, const at::Tensor& ln_weight, const at::Tensor& ln_bias, int64_t class_id, int64_t mask_id,
    double eps) {
  TORCH_CHECK(tokens.is_cuda(), "tokens must be a CUDA tensor, got ", tokens.device());
  const c10::cuda::CUDAGuard guard(tokens.device());
  TokenEmbedArgs args = token_embed_args(tokens, keep, masked, word, pos, ln_weight, ln_bias, class_id, mask_id, eps);
  TORCH_CHECK(args.dim <= kTokenEmbedMaxDim, "word_weight: the cuda kernel takes D <= ", kTokenEmbedMaxDim, ", got ",
              args.dim);
  auto outputs = token_embed_outputs(args, word);
  C10_CUDA_CHECK(launch_token_embed_forward(args, at::cuda::getCurrentCUDAStream()));
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_embed_backward(
    const at::Tensor& grad, const at::Tensor& tokens, const at::Tensor& keep, const at::Tensor& masked,
    const at::Tensor& word, const at::Tensor& pos, const at::Tensor& ln_weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t class_id, int64_t mask_id) {
  TORCH_CHECK(tokens.is_cuda(), "tokens must be a CUDA tensor, got ", tokens.device());
  const c10::cuda::CUDAGuard guard(tokens.device());
  TokenEmbedArgs args = token_embed_args(tokens, keep, masked, word, pos, ln_weight, ln_weight, class_id, mask_id, 0.0);
  TORCH_CHECK(args.dim <= kTokenEmbedMaxDim, "word_weight: the cuda kernel takes D <= ", kTokenEmbedMaxDim, ", got ",
              args.dim);
  token_embed_backward_inputs(args, grad, mean, rstd, word);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = token_rows(args), positions = args.length + 1;
  const auto f32 = word.options().dtype(at::kFloat), i64 = word.options().dtype(at::kLong);
  at::Tensor dx = at::empty({rows, args.dim}, f32), keys = at::empty({2, rows}, i64);  // word keys, position keys
  at::Tensor partial = at::empty({token_embed_backward_blocks(args), 2, args.dim}, f32);
  C10_CUDA_CHECK(launch_token_embed_backward(args, dx.data_ptr<float>(), keys.data_ptr<int64_t>(),
                                             keys.data_ptr<int64_t>() + rows, partial.data_ptr<float>(), stream));
  // Row v's sources: perm[offsets[v], offsets[v + 1]) (rows out of range sort past every v)
  const auto [sorted, indices] = at::sort(keys, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor perm = indices.contiguous();  // (2, rows): the kernel walks rows of it
  const int64_t bounds = std::max(args.vocab, positions) + 1;
  const at::Tensor offsets = at::searchsorted(sorted, at::arange(bounds, i64).repeat({2, 1}));
  at::Tensor d_word = at::empty_like(word), d_pos = at::empty_like(pos);
  for (const auto& [g, k, destinations] : {std::tuple{&d_word, 0, args.vocab}, {&d_pos, 1, positions}})
    C10_CUDA_CHECK(launch_token_embed_segment_sum(dx.data_ptr<float>(), args.dim, perm[k].data_ptr<int64_t>(),
                                                  offsets[k].data_ptr<int64_t>(), destinations, g->data_ptr(),
                                                  args.dtype, stream));
  const at::Tensor sums = partial.sum(0);
  const auto dtype = word.scalar_type();
  return {d_word, d_pos, sums[0].to(dtype, false, true), sums[1].to(dtype, false, true)};
}

struct Kernels {  // for autograd.h
  static constexpr auto unlearn_loss_forward = &fastforget::unlearn_loss_forward;
  static constexpr auto unlearn_loss_scale_grad = &fastforget::unlearn_loss_scale_grad;
  static constexpr auto masked_patch_embed = &fastforget::masked_patch_embed;
  static constexpr auto group_norm_silu_forward = &fastforget::group_norm_silu_forward;
  static constexpr auto group_norm_silu_backward = &fastforget::group_norm_silu_backward;
  static constexpr auto token_embed_forward = &fastforget::token_embed_forward;
  static constexpr auto token_embed_backward = &fastforget::token_embed_backward;
};

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY(fastforget_cuda, m) {
  m.def(fastforget::kUnlearnLossSchema);
  m.def(fastforget::kMaskedPatchEmbedAutogradSchema);
  m.def(fastforget::kUnlearnLossForwardSchema);
  m.def(fastforget::kUnlearnLossScaleGradSchema);
  m.def(fastforget::kTeacherBatchSchema);
  m.def(fastforget::kMaskedPatchEmbedSchema);
  m.def(fastforget::kDiffusionInputsSchema);
  m.def(fastforget::kGroupNormForwardSchema);
  m.def(fastforget::kGroupNormBackwardSchema);
  m.def(fastforget::kGroupNormSchema);
  m.def(fastforget::kTokenEmbedForwardSchema);
  m.def(fastforget::kTokenEmbedBackwardSchema);
  m.def(fastforget::kTokenEmbedSchema);
  m.def(fastforget::kVqQuantizeSchema);
}

TORCH_LIBRARY_IMPL(fastforget_cuda, CUDA, m) {
  m.impl("masked_patch_embed", &fastforget::masked_patch_embed);
  m.impl("make_teacher_batch", &fastforget::make_teacher_batch);
  m.impl("unlearn_loss_forward", &fastforget::unlearn_loss_forward);
  m.impl("unlearn_loss_scale_grad", &fastforget::unlearn_loss_scale_grad);
  m.impl("make_diffusion_inputs", &fastforget::make_diffusion_inputs);
  m.impl("group_norm_silu_forward", &fastforget::group_norm_silu_forward);
  m.impl("group_norm_silu_backward", &fastforget::group_norm_silu_backward);
  m.impl("token_embed_forward", &fastforget::token_embed_forward);
  m.impl("token_embed_backward", &fastforget::token_embed_backward);
  m.impl("vq_quantize", &fastforget::vq_quantize);
}

// The eager path's ops: autograd in C++ (autograd.h), and the same below autograd.
TORCH_LIBRARY_IMPL(fastforget_cuda, Autograd, m) {
  m.impl("unlearn_loss", &fastforget::unlearn_loss_autograd<fastforget::Kernels>);
  m.impl("masked_patch_embed_autograd", &fastforget::masked_patch_embed_autograd<fastforget::Kernels>);
  m.impl("group_norm_silu", &fastforget::group_norm_silu_autograd<fastforget::Kernels>);
  m.impl("token_embed", &fastforget::token_embed_autograd<fastforget::Kernels>);
}

TORCH_LIBRARY_IMPL(fastforget_cuda, CUDA, m) {
  m.impl("unlearn_loss", &fastforget::unlearn_loss_plain<fastforget::Kernels>);
  m.impl("masked_patch_embed_autograd", &fastforget::masked_patch_embed_dense<fastforget::Kernels>);
  m.impl("group_norm_silu", &fastforget::group_norm_silu_plain<fastforget::Kernels>);
  m.impl("token_embed", &fastforget::token_embed_plain<fastforget::Kernels>);
}
