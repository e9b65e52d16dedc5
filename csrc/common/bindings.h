// What both extensions' bindings share: op schemas, tensor checks, and tensors -> kernel args.
// Included by bindings.cpp files only (it needs torch); kernels stay torch-free.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "diffusion_inputs.h"
#include "group_norm.h"
#include "patch_embed.h"
#include "token_embed.h"
#include "teacher_batch.h"
#include "unlearn_loss.h"
#include "vq_quantize.h"

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

// The diffusion family's step inputs: (student, teacher) from one pass (diffusion_inputs.h).
constexpr const char* kDiffusionInputsSchema =
    "make_diffusion_inputs(Tensor y_0, Tensor y_cond, Tensor mask, Tensor gammas, Tensor is_forget, Tensor noise, "
    "Tensor stream, bool given) -> (Tensor, Tensor)";

// GroupNorm + scale-shift + SiLU (the diffusion UNet's chain): forward saves (mean, rstd) per
// (image, group); backward returns [dx, then the gradients of the weight, bias, scale, shift given].
constexpr const char* kGroupNormForwardSchema =
    "group_norm_silu_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int groups, "
    "float eps, bool silu) -> (Tensor, Tensor, Tensor)";
constexpr const char* kGroupNormBackwardSchema =
    "group_norm_silu_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
    "Tensor mean, Tensor rstd, int groups, bool silu) -> Tensor[]";

// Vector quantisation: (N,) int64, each row's nearest code (vq_quantize.h).
constexpr const char* kVqQuantizeSchema = "vq_quantize(Tensor z, Tensor codebook) -> Tensor";

// MAGE's token embedding of the kept positions (token_embed.h): forward saves (mean, rstd) per
// row; backward returns the gradients of word_weight, pos_weight, ln_weight and ln_bias.
constexpr const char* kTokenEmbedForwardSchema =
    "token_embed_forward(Tensor tokens, Tensor keep, Tensor masked, Tensor word_weight, Tensor pos_weight, "
    "Tensor ln_weight, Tensor ln_bias, int class_id, int mask_id, float eps) -> (Tensor, Tensor, Tensor)";
constexpr const char* kTokenEmbedBackwardSchema =
    "token_embed_backward(Tensor grad, Tensor tokens, Tensor keep, Tensor masked, Tensor word_weight, "
    "Tensor pos_weight, Tensor ln_weight, Tensor mean, Tensor rstd, int class_id, int mask_id) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

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

// Checks the diffusion inputs' tensors (contiguous; y_0 (B, C, H, W) and y_cond (B, Cc, H, W) of one
// dtype; mask (B, 1 or C, H, W) uint8; gammas (B,) float32; noise y_0's shape when given; the
// stream two int64) and allocates the outputs.
inline DiffusionInputsArgs diffusion_inputs_args(const at::Tensor& y_0, const at::Tensor& y_cond,
                                                 const at::Tensor& mask, const at::Tensor& gammas,
                                                 const at::Tensor& is_forget, const at::Tensor& noise,
                                                 const at::Tensor& stream, bool given, at::Tensor& student,
                                                 at::Tensor& teacher) {
  TORCH_CHECK(y_0.dim() == 4 && y_0.numel() > 0 && y_0.is_contiguous(), "y_0 must be contiguous (B, C, H, W)");
  const int64_t batch = y_0.size(0), channels = y_0.size(1), positions = y_0.size(2) * y_0.size(3);
  TORCH_CHECK(y_cond.dim() == 4 && y_cond.size(0) == batch && y_cond.size(2) == y_0.size(2) &&
                  y_cond.size(3) == y_0.size(3) && y_cond.is_contiguous() && y_cond.scalar_type() == y_0.scalar_type(),
              "y_cond must be contiguous (", batch, ", Cc, H, W) of y_0's dtype, got ", y_cond.sizes());
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == batch && (mask.size(1) == 1 || mask.size(1) == channels) &&
                  mask.size(2) == y_0.size(2) && mask.size(3) == y_0.size(3) && mask.is_contiguous() &&
                  mask.scalar_type() == at::kByte,
              "mask must be contiguous uint8 (", batch, ", 1 or ", channels, ", H, W), got ", mask.sizes());
  TORCH_CHECK(gammas.numel() == batch && gammas.is_contiguous() && gammas.scalar_type() == at::kFloat,
              "gammas must be contiguous float32 (", batch, ",)");
  TORCH_CHECK(!given || (noise.sizes() == y_0.sizes() && noise.is_contiguous()), "noise must be contiguous ",
              y_0.sizes());
  TORCH_CHECK(stream.numel() == 2 && stream.scalar_type() == at::kLong && stream.is_contiguous(),
              "stream must be two int64 (seed, first element)");
  for (const auto& [t, name] : {std::pair{&y_cond, "y_cond"}, {&mask, "mask"}, {&gammas, "gammas"},
                                {&is_forget, "is_forget"}, {&stream, "stream"}})
    TORCH_CHECK(t->device() == y_0.device(), name, " must be on ", y_0.device());
  const std::vector<int64_t> shape{batch, y_cond.size(1) + channels, y_0.size(2), y_0.size(3)};
  student = at::empty(shape, y_0.options());
  teacher = at::empty(shape, y_0.options());
  return DiffusionInputsArgs{y_0.data_ptr(), y_cond.data_ptr(), dtype_of(y_0, "y_0"),
                             given ? noise.data_ptr() : nullptr, given ? dtype_of(noise, "noise") : DType::kFloat32,
                             mask.data_ptr<uint8_t>(), mask.size(1), gammas.data_ptr<float>(),
                             forget_flags(is_forget, y_0), stream.data_ptr<int64_t>(), student.data_ptr(),
                             teacher.data_ptr(), batch, channels, y_cond.size(1), positions};
}

// Checks the group norm's inputs (x (B, C, ...) contiguous with C a multiple of groups; weight and
// bias (C,) of one dtype; scale and shift (B, C) of one dtype; all on x's device) and points the
// kernel arguments at them; outputs and statistics are filled in by the caller.
// Whether a (B, C, H, W) tensor is laid out channels last (and not also plainly contiguous).
inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline GroupNormArgs group_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu,
                                     bool allow_channels_last) {
  const bool channels_last = allow_channels_last && is_channels_last(x);
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0 && (x.is_contiguous() || channels_last) && groups > 0 &&
                  x.size(1) % groups == 0,
              "x must be a non-empty contiguous", allow_channels_last ? " or channels-last" : "",
              " (B, C, ...) tensor with C a multiple of groups ", groups, ", got ", x.sizes());
  const int64_t batch = x.size(0), channels = x.size(1);
  auto check = [&](const std::optional<at::Tensor>& t, const char* name, std::vector<int64_t> shape) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->is_contiguous() && t->device() == x.device() && t->sizes() == at::IntArrayRef(shape), name,
                " must be contiguous ", at::IntArrayRef(shape), " on ", x.device(), ", got ", t->sizes());
  };
  check(weight, "weight", {channels});
  check(bias, "bias", {channels});
  check(scale, "scale", {batch, channels});
  check(shift, "shift", {batch, channels});
  TORCH_CHECK(!(weight && bias) || weight->scalar_type() == bias->scalar_type(), "weight and bias must share a dtype");
  TORCH_CHECK(!(scale && shift) || scale->scalar_type() == shift->scalar_type(), "scale and shift must share a dtype");
  auto ptr = [](const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; };
  auto dtype = [](const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b) {
    const std::optional<at::Tensor>& t = a ? a : b;
    return t ? dtype_of(*t, "parameter") : DType::kFloat32;
  };
  GroupNormArgs args{};
  args.x = x.data_ptr();
  args.x_dtype = dtype_of(x, "x");
  args.weight = ptr(weight);
  args.bias = ptr(bias);
  args.param_dtype = dtype(weight, bias);
  args.scale = ptr(scale);
  args.shift = ptr(shift);
  args.film_dtype = dtype(scale, shift);
  args.batch = batch;
  args.channels = channels;
  args.positions = x.numel() / (batch * channels);
  args.groups = groups;
  args.eps = float(eps);
  args.silu = silu;
  args.channels_last = channels_last;
  return args;
}

// Forward's outputs (y like x; mean and rstd (B, groups) float32), with args pointed at them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_outputs(GroupNormArgs& args, const at::Tensor& x) {
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({args.batch, args.groups}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  args.y = y.data_ptr();
  args.mean = mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  return {y, mean, rstd};
}

// Backward's buffers: checks grad, mean and rstd, allocates dx and the (4, B, C) float32 sums
// GroupNormArgs describes, and points args at them all. Returns {dx, sums}.
inline std::pair<at::Tensor, at::Tensor> group_norm_backward_buffers(GroupNormArgs& args, const at::Tensor& grad,
                                                                     const at::Tensor& x, const at::Tensor& mean,
                                                                     const at::Tensor& rstd) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.strides() == x.strides() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              "grad must have x's shape, strides, dtype and device");
  TORCH_CHECK(mean.numel() == args.batch * args.groups && rstd.numel() == mean.numel() &&
                  mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.device() == x.device() && rstd.device() == x.device(),
              "mean and rstd must be contiguous float32 (B, groups) on ", x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor sums = at::empty({4, args.batch, args.channels}, x.options().dtype(at::kFloat));
  args.mean = const_cast<float*>(mean.data_ptr<float>());
  args.rstd = const_cast<float*>(rstd.data_ptr<float>());
  args.dy = grad.data_ptr();
  args.dx = dx.data_ptr();
  args.d_weight = sums[0].data_ptr<float>();
  args.d_bias = sums[1].data_ptr<float>();
  args.d_scale = sums[2].data_ptr<float>();
  args.d_shift = sums[3].data_ptr<float>();
  return {dx, sums};
}

// [dx, then the gradients of the weight, bias, scale and shift given] from backward's sums: the
// weight's and bias's summed over images in a fixed order; each its parameter's dtype, a copy
// (outputs of a custom op never share storage).
inline std::vector<at::Tensor> group_norm_grads(const at::Tensor& dx, const at::Tensor& sums,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& scale,
                                                const std::optional<at::Tensor>& shift) {
  std::vector<at::Tensor> grads{dx};
  if (weight) grads.push_back(sums[0].sum(0).to(weight->scalar_type()));
  if (bias) grads.push_back(sums[1].sum(0).to(bias->scalar_type()));
  if (scale) grads.push_back(sums[2].to(scale->scalar_type(), false, true));
  if (shift) grads.push_back(sums[3].to(shift->scalar_type(), false, true));
  return grads;
}

// MAGE's token embedding (token_embed.h): checks the tensors (contiguous tokens (B, L) int64,
// keep (B, K) int64, masked (B, K) bool; word (V, D), pos (1 + L, D), ln_weight and ln_bias (D,)
// of one float dtype; one device; class_id and mask_id in [0, V)) and points the kernel
// arguments at them. Outputs and backward's buffers are filled in by the caller.
inline TokenEmbedArgs token_embed_args(const at::Tensor& tokens, const at::Tensor& keep, const at::Tensor& masked,
                                       const at::Tensor& word, const at::Tensor& pos, const at::Tensor& ln_weight,
                                       const at::Tensor& ln_bias, int64_t class_id, int64_t mask_id, double eps) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.numel() > 0 && tokens.scalar_type() == at::kLong && tokens.is_contiguous(),
              "tokens must be contiguous int64 (B, L) with B, L >= 1, got ", tokens.sizes(), " ", tokens.scalar_type());
  const int64_t batch = tokens.size(0), length = tokens.size(1);
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == batch && keep.size(1) > 0 && keep.scalar_type() == at::kLong &&
                  keep.is_contiguous(),
              "keep must be contiguous int64 (", batch, ", K >= 1), got ", keep.sizes(), " ", keep.scalar_type());
  TORCH_CHECK(masked.sizes() == keep.sizes() && masked.scalar_type() == at::kBool && masked.is_contiguous(),
              "masked must be contiguous bool ", keep.sizes(), ", got ", masked.sizes(), " ", masked.scalar_type());
  TORCH_CHECK(word.dim() == 2 && word.numel() > 0 && word.is_contiguous(),
              "word_weight must be contiguous (V, D) with V, D >= 1, got ", word.sizes());
  const int64_t vocab = word.size(0), dim = word.size(1);
  TORCH_CHECK(pos.sizes() == at::IntArrayRef({1 + length, dim}) && pos.is_contiguous(),
              "pos_weight must be contiguous (", 1 + length, ", ", dim, "), got ", pos.sizes());
  for (const auto& [t, name] : {std::pair{&ln_weight, "ln_weight"}, {&ln_bias, "ln_bias"}})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == dim && t->is_contiguous(), name, " must be contiguous (", dim,
                ",), got ", t->sizes());
  for (const auto& [t, name] : {std::pair{&pos, "pos_weight"}, {&ln_weight, "ln_weight"}, {&ln_bias, "ln_bias"}})
    TORCH_CHECK(t->scalar_type() == word.scalar_type(), name, " must be ", word.scalar_type(), ", got ",
                t->scalar_type());
  for (const auto& [t, name] : {std::pair{&keep, "keep"}, {&masked, "masked"}, {&word, "word_weight"},
                                {&pos, "pos_weight"}, {&ln_weight, "ln_weight"}, {&ln_bias, "ln_bias"}})
    TORCH_CHECK(t->device() == tokens.device(), name, " must be on ", tokens.device(), ", got ", t->device());
  TORCH_CHECK(class_id >= 0 && class_id < vocab && mask_id >= 0 && mask_id < vocab, "class_id and mask_id must lie in [0, ",
              vocab, "), got ", class_id, " and ", mask_id);
  TokenEmbedArgs a{};
  a.tokens = tokens.data_ptr<int64_t>();
  a.keep = keep.data_ptr<int64_t>();
  a.masked = reinterpret_cast<const uint8_t*>(masked.data_ptr<bool>());
  a.word = word.data_ptr();
  a.pos = pos.data_ptr();
  a.ln_weight = ln_weight.data_ptr();
  a.ln_bias = ln_bias.data_ptr();
  a.dtype = dtype_of(word, "word_weight");
  a.batch = batch;
  a.length = length;
  a.keep_count = keep.size(1);
  a.dim = dim;
  a.vocab = vocab;
  a.class_id = class_id;
  a.mask_id = mask_id;
  a.eps = float(eps);
  return a;
}

// Forward's outputs (out (B, 1 + K, D) in the weights' dtype; mean and rstd (B, 1 + K) float32),
// with args pointed at them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> token_embed_outputs(TokenEmbedArgs& a, const at::Tensor& word) {
  at::Tensor out = at::empty({a.batch, 1 + a.keep_count, a.dim}, word.options());
  at::Tensor mean = at::empty({a.batch, 1 + a.keep_count}, word.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  a.out = out.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  return {out, mean, rstd};
}

// Checks backward's grad (B, 1 + K, D), mean and rstd (B, 1 + K) float32, and points args at them.
inline void token_embed_backward_inputs(TokenEmbedArgs& a, const at::Tensor& grad, const at::Tensor& mean,
                                        const at::Tensor& rstd, const at::Tensor& word) {
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({a.batch, 1 + a.keep_count, a.dim}) && grad.is_contiguous() &&
                  grad.scalar_type() == word.scalar_type() && grad.device() == word.device(),
              "grad must be contiguous ", word.scalar_type(), " (", a.batch, ", ", 1 + a.keep_count, ", ", a.dim,
              ") on ", word.device(), ", got ", grad.sizes(), " ", grad.scalar_type());
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, {&rstd, "rstd"}})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({a.batch, 1 + a.keep_count}) && t->is_contiguous() &&
                    t->scalar_type() == at::kFloat && t->device() == word.device(),
                name, " must be contiguous float32 (", a.batch, ", ", 1 + a.keep_count, ") on ", word.device());
  a.dy = grad.data_ptr();
  a.mean = const_cast<float*>(mean.data_ptr<float>());
  a.rstd = const_cast<float*>(rstd.data_ptr<float>());
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

// Checks vector quantisation's tensors (contiguous z (N, e), codebook (K >= 1, e), one device),
// makes the (N,) int64 indices and points the kernel arguments at them all.
inline VqQuantizeArgs vq_quantize_args(const at::Tensor& z, const at::Tensor& codebook, at::Tensor& indices) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && z.size(1) > 0, "z must be a contiguous (N, e) tensor, got ",
              z.sizes());
  TORCH_CHECK(codebook.dim() == 2 && codebook.is_contiguous() && codebook.size(0) > 0 &&
                  codebook.size(1) == z.size(1),
              "codebook must be a contiguous (K >= 1, ", z.size(1), ") tensor, got ", codebook.sizes());
  TORCH_CHECK(codebook.device() == z.device(), "codebook must be on ", z.device(), ", got ", codebook.device());
  TORCH_CHECK(codebook.size(0) < (int64_t(1) << 31), "codebook: at most 2^31 - 1 codes, got ", codebook.size(0));
  indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  return VqQuantizeArgs{z.data_ptr(), dtype_of(z, "z"), codebook.data_ptr(), dtype_of(codebook, "codebook"),
                        z.size(0), codebook.size(0), z.size(1), indices.data_ptr<int64_t>()};
}

}  // namespace fastforget
