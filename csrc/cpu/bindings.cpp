// Torch bindings of the CPU kernels: check tensors, turn them into pointers, register the ops
// under torch.ops.fastforget_cpu. Threads come from torch's pool (torch.set_num_threads).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "../common/autograd.h"
#include "../common/bindings.h"
#include "attention.h"
#include "diffusion_inputs.h"
#include "group_norm.h"
#include "patch_embed.h"
#include "token_embed.h"
#include "teacher_batch.h"
#include "unlearn_loss.h"
#include "vq_quantize.h"

namespace fastforget {
namespace {

// The CPU has no caching allocator: a fresh 50 MB gradient costs a page fault per 4 KiB page, more
// than the kernel itself. Keep the storages of recent gradients and hand one out again once
// nothing else holds it (no tensor or view left on it), so steady-state training reuses warm pages.
// At most kPoolSize storages and kPoolBytes in all: a one-off huge gradient is not kept for life.
at::Tensor grad_buffer(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  constexpr size_t kPoolSize = 4, kPoolBytes = size_t(256) << 20;
  static std::mutex mutex;
  static std::vector<c10::Storage> pool;
  const size_t nbytes = size_t(rows) * size_t(cols) * options.dtype().itemsize();
  auto unused = [](const c10::Storage& s) { return s.use_count() == 1; };
  const std::lock_guard<std::mutex> lock(mutex);
  for (const c10::Storage& s : pool)
    if (unused(s) && s.nbytes() == nbytes) return at::empty({0}, options).set_(s, 0, {rows, cols}, {cols, 1});
  at::Tensor fresh = at::empty({rows, cols}, options);
  if (nbytes > kPoolBytes) return fresh;
  auto pooled_bytes = [&] {
    size_t total = 0;
    for (const c10::Storage& s : pool) total += s.nbytes();
    return total;
  };
  while (pool.size() >= kPoolSize || pooled_bytes() + nbytes > kPoolBytes) {
    auto it = std::find_if(pool.begin(), pool.end(), unused);  // the oldest unused one
    if (it == pool.end()) return fresh;  // all in use: do not grow past the caps
    pool.erase(it);
  }
  pool.push_back(fresh.storage());
  return fresh;
}

// Grain: enough (row, chunk) tasks per thread job that scheduling costs nothing.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(cols, 1)); }

// One parallel pass over every (tensor, row, chunk) of the table; then per tensor, rows in a fixed
// order, the sets' sums (deterministic for any thread count); the outputs sum the tensors'.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> unlearn_loss_forward(
    at::TensorList students, at::TensorList retain_targets, at::TensorList forget_targets,
    const at::Tensor& is_forget, double retain_weight, double forget_weight, int64_t normalize, bool compute_grad) {
  TORCH_CHECK(!students.empty() && students[0].device().is_cpu(), "students must be CPU tensors");
  std::vector<at::Tensor> grads;
  const std::vector<UnlearnLossArgs> table = unlearn_loss_table(
      students, retain_targets, forget_targets, is_forget, retain_weight, forget_weight, normalize, compute_grad,
      grads, grad_buffer);
  const int64_t rows = table[0].rows;
  const uint8_t* forget = table[0].is_forget;
  int64_t n_forget = 0;
  for (int64_t b = 0; b < rows; ++b) n_forget += forget[b] != 0;
  std::vector<int64_t> first_task{0};  // tensor i's tasks are [first_task[i], first_task[i + 1])
  for (const UnlearnLossArgs& a : table) first_task.push_back(first_task.back() + a.rows * num_chunks(a.cols));
  std::vector<float> partial(first_task.back());
  at::parallel_for(0, first_task.back(), grain(table[0].cols), [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < table.size(); ++i) {  // the part of [begin, end) in tensor i
      const int64_t lo = std::max(begin, first_task[i]), hi = std::min(end, first_task[i + 1]);
      if (lo < hi) unlearn_loss_chunks(table[i], n_forget, lo - first_task[i], hi - first_task[i],
                                       partial.data() + first_task[i]);
    }
  });
  const float norm_retain = set_norm(int32_t(normalize), rows - n_forget, rows);
  const float norm_forget = set_norm(int32_t(normalize), n_forget, rows);
  float retain_loss = 0.0f, forget_loss = 0.0f;
  for (size_t i = 0; i < table.size(); ++i) {
    const int64_t chunks = num_chunks(table[i].cols);
    const float* p = partial.data() + first_task[i];
    double sum_retain = 0.0, sum_forget = 0.0;
    for (int64_t b = 0; b < rows; ++b) {
      float row = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) row += p[b * chunks + c];
      (forget[b] ? sum_forget : sum_retain) += row;
    }
    retain_loss += float(sum_retain / table[i].cols) * norm_retain;
    forget_loss += float(sum_forget / table[i].cols) * norm_forget;
  }
  const float w_r = float(retain_weight), w_f = float(forget_weight);
  auto scalar = [&](float v) { return at::full({}, v, students[0].options().dtype(at::kFloat)); };
  return {scalar(w_r * retain_loss + w_f * forget_loss), scalar(retain_loss), scalar(forget_loss), grads};
}

float scalar_or_zero(const std::optional<at::Tensor>& t) { return t.has_value() ? t->item<float>() : 0.0f; }

void unlearn_loss_scale_grad(at::TensorList grads, const at::Tensor& is_forget,
                             const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_retain,
                             const std::optional<at::Tensor>& grad_forget, double retain_weight,
                             double forget_weight) {
  if (grads.empty()) return;
  const float g = scalar_or_zero(grad_loss);
  const float scale_retain = backward_scale(g, scalar_or_zero(grad_retain), float(retain_weight));
  const float scale_forget = backward_scale(g, scalar_or_zero(grad_forget), float(forget_weight));
  if (scale_retain == 1.0f && scale_forget == 1.0f) return;
  for (const at::Tensor& grad : grads) {
    TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.device().is_cpu(),
                "grads must be contiguous 2-D CPU tensors, got ", grad.sizes());
    const int64_t rows = grad.size(0), cols = grad.size(1);
    const uint8_t* forget = forget_flags(is_forget, grad);
    const DType dtype = dtype_of(grad, "grad");
    at::parallel_for(0, rows * num_chunks(cols), grain(cols), [&](int64_t begin, int64_t end) {
      scale_rows_chunks(grad.data_ptr(), dtype, forget, cols, scale_retain, scale_forget, begin, end);
    });
  }
}

at::Tensor make_teacher_batch(const at::Tensor& images, const at::Tensor& is_forget, const at::Tensor& stream,
                              int64_t noise, std::optional<double> clamp_lo, std::optional<double> clamp_hi) {
  TORCH_CHECK(images.device().is_cpu(), "images must be on the CPU, got ", images.device());
  at::Tensor out;
  const TeacherBatchArgs args = teacher_batch_args(images, is_forget, stream, noise, clamp_lo, clamp_hi, out);
  float mean = 0.0f, std = 0.0f;
  if (args.noise != Noise::kUniform) {  // statistics of the whole batch, merged in a fixed order
    const int64_t numel = images.numel(), chunks = stats_chunks(numel);
    std::vector<Moments> moments(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      teacher_batch_moments(args.images, args.dtype, numel, begin, end, moments.data());
    });
    Moments total{0.0, 0.0, 0.0};
    for (const Moments& m : moments) total = merge(total, m);
    mean = float(total.mean);
    std = float(std::sqrt(total.m2 / (total.count - 1.0)));  // unbiased, as torch.std (nan for one element)
  }
  at::parallel_for(0, args.rows, std::max<int64_t>(1, (1 << 16) / args.row_numel), [&](int64_t begin, int64_t end) {
    teacher_batch_rows(args, mean, std, begin, end);
  });
  return out;
}

at::Tensor masked_patch_embed(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& pos, const at::Tensor& ids_keep,
                              const std::optional<at::Tensor>& cls) {
  TORCH_CHECK(images.device().is_cpu(), "images must be on the CPU, got ", images.device());
  const int64_t length = pos.numel() / std::max<int64_t>(weight.size(0), 1) - 1;
  if (ids_keep.numel() > 0) {
    const auto [low, high] = at::aminmax(ids_keep);
    TORCH_CHECK(low.item<int64_t>() >= 0 && high.item<int64_t>() < length, "ids_keep must lie in [0, ", length, ")");
  }
  return masked_patch_embed_with(images, weight, bias, pos, ids_keep, cls, [](const PatchEmbedArgs& args) {
    const int64_t rows = args.batch * patch_tokens(args);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) { gather_patches(args, begin, end); });
  });
}

std::tuple<at::Tensor, at::Tensor> make_diffusion_inputs(const at::Tensor& y_0, const at::Tensor& y_cond,
                                                         const at::Tensor& mask, const at::Tensor& gammas,
                                                         const at::Tensor& is_forget, const at::Tensor& noise,
                                                         const at::Tensor& stream, bool given) {
  TORCH_CHECK(y_0.device().is_cpu(), "y_0 must be on the CPU, got ", y_0.device());
  at::Tensor student, teacher;
  const DiffusionInputsArgs args = diffusion_inputs_args(y_0, y_cond, mask, gammas, is_forget, noise, stream, given,
                                                         student, teacher);
  const int64_t image_elems = (args.channels + args.cond_channels) * args.positions;
  at::parallel_for(0, args.batch, std::max<int64_t>(1, (1 << 16) / image_elems), [&](int64_t begin, int64_t end) {
    diffusion_inputs_images(args, begin, end);
  });
  return {student, teacher};
}

// One task per (image, group) pair; enough pairs per job that scheduling costs nothing.
int64_t pair_grain(const GroupNormArgs& a) {
  return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, a.channels / a.groups * a.positions));
}

// Group norm's tasks: (image, group) pairs, or images when channels last; and their grain.
std::pair<int64_t, int64_t> group_norm_tasks(const GroupNormArgs& a) {
  if (a.channels_last) return {a.batch, std::max<int64_t>(1, (1 << 15) / (a.channels * a.positions))};
  return {a.batch * a.groups, pair_grain(a)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t groups, double eps,
    bool silu) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  GroupNormArgs args = group_norm_args(x, weight, bias, scale, shift, groups, eps, silu, true);
  auto outputs = group_norm_outputs(args, x);
  const auto [tasks, grain] = group_norm_tasks(args);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { group_norm_forward_tasks(args, begin, end); });
  return outputs;
}

std::vector<at::Tensor> group_norm_silu_backward(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    bool silu) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  GroupNormArgs args = group_norm_args(x, weight, bias, scale, shift, groups, 0.0, silu, true);
  auto [dx, sums] = group_norm_backward_buffers(args, grad, x, mean, rstd);
  const auto [tasks, grain] = group_norm_tasks(args);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { group_norm_backward_tasks(args, begin, end); });
  return group_norm_grads(dx, sums, weight, bias, scale, shift);
}

// The codebook packed once (a panel per task group), then tasks of rows: each row's argmin.
at::Tensor vq_quantize(const at::Tensor& z_in, const at::Tensor& codebook_in) {
  TORCH_CHECK(z_in.device().is_cpu(), "z must be on the CPU, got ", z_in.device());
  const at::Tensor z = z_in.contiguous(), codebook = codebook_in.contiguous();
  at::Tensor indices;
  const VqQuantizeArgs args = vq_quantize_args(z, codebook, indices);
  if (args.rows == 0) return indices;
  at::Tensor packed = at::empty({vq_packed_floats(args)}, z.options().dtype(at::kFloat));
  float* p = packed.data_ptr<float>();
  at::parallel_for(0, vq_panels(args), std::max<int64_t>(1, 4096 / args.dim), [&](int64_t begin, int64_t end) {
    vq_pack_panels(args, p, begin, end);
  });
  at::parallel_for(0, (args.rows + kVqTaskRows - 1) / kVqTaskRows, 1, [&](int64_t begin, int64_t end) {
    vq_quantize_tasks(args, p, begin, end);
  });
  return indices;
}

// Attention over a packed qkv projection: CPU only (see attention.h), so its schemas live here.
constexpr const char* kAttentionForwardSchema = "qkv_attention_forward(Tensor qkv, int heads) -> (Tensor, Tensor)";
constexpr const char* kAttentionBackwardSchema =
    "qkv_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int heads) -> Tensor";

AttentionArgs attention_args(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu(), "qkv must be on the CPU, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && heads > 0 && qkv.size(2) % (3 * heads) == 0,
              "qkv must be contiguous (B, T, 3 * heads * head_dim) with heads = ", heads, ", got ", qkv.sizes());
  const int64_t head_dim = qkv.size(2) / (3 * heads);
  TORCH_CHECK(qkv.size(1) <= kAttentionMaxTokens && head_dim <= kAttentionMaxHeadDim,
              "qkv: the CPU kernel takes up to ", kAttentionMaxTokens, " tokens and head_dim ", kAttentionMaxHeadDim,
              ", got ", qkv.size(1), " and ", head_dim);
  return AttentionArgs{qkv.data_ptr(), dtype_of(qkv, "qkv"), nullptr, nullptr, nullptr, nullptr,
                       qkv.size(0), qkv.size(1), heads, head_dim, float(1.0 / std::sqrt(double(head_dim)))};
}

// Pairs per task: enough score work (about 4 T^2 d flops a pair) that scheduling costs nothing.
int64_t pair_grain(const AttentionArgs& a) {
  return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, a.tokens * a.tokens * a.head_dim));
}

std::tuple<at::Tensor, at::Tensor> qkv_attention_forward(const at::Tensor& qkv, int64_t heads) {
  AttentionArgs args = attention_args(qkv, heads);
  at::Tensor out = at::empty({args.batch, args.tokens, heads * args.head_dim}, qkv.options());
  at::Tensor lse = at::empty({args.batch, heads, args.tokens}, qkv.options().dtype(at::kFloat));
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  at::parallel_for(0, args.batch * heads, pair_grain(args), [&](int64_t begin, int64_t end) {
    attention_forward_pairs(args, begin, end);
  });
  return {out, lse};
}

at::Tensor qkv_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                  const at::Tensor& lse, int64_t heads) {
  AttentionArgs args = attention_args(qkv, heads);
  const std::vector<int64_t> out_shape{args.batch, args.tokens, heads * args.head_dim};
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, {&out, "out"}})
    TORCH_CHECK(t->sizes() == out_shape && t->is_contiguous() && t->scalar_type() == qkv.scalar_type() &&
                    t->device().is_cpu(),
                name, " must be contiguous ", qkv.scalar_type(), " ", at::IntArrayRef(out_shape), " on the CPU, got ",
                t->sizes(), " ", t->scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({args.batch, heads, args.tokens}) && lse.is_contiguous() &&
                  lse.scalar_type() == at::kFloat,
              "lse must be contiguous float32 (", args.batch, ", ", heads, ", ", args.tokens, "), got ", lse.sizes());
  at::Tensor grad_qkv = at::empty_like(qkv);
  args.out = const_cast<void*>(out.data_ptr());
  args.grad_out = grad_out.data_ptr();
  args.lse = const_cast<float*>(lse.data_ptr<float>());
  args.grad_qkv = grad_qkv.data_ptr();
  at::parallel_for(0, args.batch * heads, pair_grain(args), [&](int64_t begin, int64_t end) {
    attention_backward_pairs(args, begin, end);
  });
  return grad_qkv;
}

// MAGE's token embedding: rows in parallel; backward's three deterministic stages (token_embed.h).
void check_token_ranges(const TokenEmbedArgs& a, const at::Tensor& tokens, const at::Tensor& keep) {
  for (const auto& [t, name, high] : {std::tuple{&tokens, "tokens", a.vocab}, {&keep, "keep", a.length}}) {
    const auto [low, top] = at::aminmax(*t);
    TORCH_CHECK(low.item<int64_t>() >= 0 && top.item<int64_t>() < high, name, " must lie in [0, ", high, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_embed_forward(
    const at::Tensor& tokens, const at::Tensor& keep, const at::Tensor& masked, const at::Tensor& word,
    const at::Tensor& pos, const at::Tensor& ln_weight, const at::Tensor& ln_bias, int64_t class_id, int64_t mask_id,
    double eps) {
  TORCH_CHECK(tokens.device().is_cpu(), "tokens must be on the CPU, got ", tokens.device());
  TokenEmbedArgs args = token_embed_args(tokens, keep, masked, word, pos, ln_weight, ln_bias, class_id, mask_id, eps);
  check_token_ranges(args, tokens, keep);
  auto outputs = token_embed_outputs(args, word);
  at::parallel_for(0, token_rows(args), grain(args.dim), [&](int64_t begin, int64_t end) {
    token_embed_forward_rows(args, begin, end);
  });
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_embed_backward(
    const at::Tensor& grad, const at::Tensor& tokens, const at::Tensor& keep, const at::Tensor& masked,
    const at::Tensor& word, const at::Tensor& pos, const at::Tensor& ln_weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t class_id, int64_t mask_id) {
  TORCH_CHECK(tokens.device().is_cpu(), "tokens must be on the CPU, got ", tokens.device());
  TokenEmbedArgs args = token_embed_args(tokens, keep, masked, word, pos, ln_weight, ln_weight, class_id, mask_id, 0.0);
  check_token_ranges(args, tokens, keep);
  token_embed_backward_inputs(args, grad, mean, rstd, word);
  const int64_t rows = token_rows(args), dim = args.dim, blocks = token_row_blocks(args);
  const auto f32 = word.options().dtype(at::kFloat);
  // dx: pooled as the loss's gradients are (a fresh 25 MB at MAGE's shape costs its page faults each step)
  at::Tensor dx = grad_buffer(rows, dim, f32), partial = at::empty({blocks, 2, dim}, f32);
  float *dx_p = dx.data_ptr<float>(), *partial_p = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    token_embed_backward_blocks(args, dx_p, partial_p, begin, end);
  });
  at::Tensor d_ln_weight = at::empty({dim}, word.options()), d_ln_bias = at::empty({dim}, word.options());
  token_embed_ln_grads(args, partial_p, d_ln_weight.data_ptr(), d_ln_bias.data_ptr());
  const int64_t positions = args.length + 1;
  at::Tensor index = at::empty({args.vocab + 1 + positions + 1 + 2 * rows}, word.options().dtype(at::kLong));
  int64_t* word_offsets = index.data_ptr<int64_t>();
  int64_t *pos_offsets = word_offsets + args.vocab + 1, *word_sources = pos_offsets + positions + 1,
          *pos_sources = word_sources + rows;
  token_embed_sources(args, word_offsets, word_sources, pos_offsets, pos_sources);
  at::Tensor d_word = at::empty_like(word), d_pos = at::empty_like(pos);
  for (const auto& [grad_t, offsets, sources, count] : {std::tuple{&d_word, word_offsets, word_sources, args.vocab},
                                                         {&d_pos, pos_offsets, pos_sources, positions}}) {
    void* out = grad_t->data_ptr();
    const int64_t n = count;
    const int64_t *o = offsets, *s = sources;
    at::parallel_for(0, token_embed_scatter_tasks(n, dim), 1, [&](int64_t begin, int64_t end) {
      token_embed_scatter_rows(dx_p, dim, o, s, out, args.dtype, n, begin, end);
    });
  }
  return {d_word, d_pos, d_ln_weight, d_ln_bias};
}

struct Kernels {  // for autograd.h
  static constexpr auto unlearn_loss_forward = &fastforget::unlearn_loss_forward;
  static constexpr auto unlearn_loss_scale_grad = &fastforget::unlearn_loss_scale_grad;
  static constexpr auto masked_patch_embed = &fastforget::masked_patch_embed;
  static constexpr auto qkv_attention_forward = &fastforget::qkv_attention_forward;
  static constexpr auto qkv_attention_backward = &fastforget::qkv_attention_backward;
  static constexpr auto group_norm_silu_forward = &fastforget::group_norm_silu_forward;
  static constexpr auto group_norm_silu_backward = &fastforget::group_norm_silu_backward;
  static constexpr auto token_embed_forward = &fastforget::token_embed_forward;
  static constexpr auto token_embed_backward = &fastforget::token_embed_backward;
};

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY(fastforget_cpu, m) {
  m.def(fastforget::kUnlearnLossSchema);
  m.def(fastforget::kMaskedPatchEmbedAutogradSchema);
  m.def(fastforget::kAttentionSchema);
  m.def(fastforget::kUnlearnLossForwardSchema);
  m.def(fastforget::kUnlearnLossScaleGradSchema);
  m.def(fastforget::kTeacherBatchSchema);
  m.def(fastforget::kMaskedPatchEmbedSchema);
  m.def(fastforget::kAttentionForwardSchema);
  m.def(fastforget::kAttentionBackwardSchema);
  m.def(fastforget::kDiffusionInputsSchema);
  m.def(fastforget::kGroupNormForwardSchema);
  m.def(fastforget::kGroupNormBackwardSchema);
  m.def(fastforget::kGroupNormSchema);
  m.def(fastforget::kTokenEmbedForwardSchema);
  m.def(fastforget::kTokenEmbedBackwardSchema);
  m.def(fastforget::kTokenEmbedSchema);
  m.def(fastforget::kVqQuantizeSchema);
}

TORCH_LIBRARY_IMPL(fastforget_cpu, CPU, m) {
  m.impl("masked_patch_embed", &fastforget::masked_patch_embed);
  m.impl("make_teacher_batch", &fastforget::make_teacher_batch);
  m.impl("unlearn_loss_forward", &fastforget::unlearn_loss_forward);
  m.impl("unlearn_loss_scale_grad", &fastforget::unlearn_loss_scale_grad);
  m.impl("qkv_attention_forward", &fastforget::qkv_attention_forward);
  m.impl("qkv_attention_backward", &fastforget::qkv_attention_backward);
  m.impl("make_diffusion_inputs", &fastforget::make_diffusion_inputs);
  m.impl("group_norm_silu_forward", &fastforget::group_norm_silu_forward);
  m.impl("group_norm_silu_backward", &fastforget::group_norm_silu_backward);
  m.impl("token_embed_forward", &fastforget::token_embed_forward);
  m.impl("token_embed_backward", &fastforget::token_embed_backward);
  m.impl("vq_quantize", &fastforget::vq_quantize);
}

// The eager path's ops: autograd in C++ (autograd.h), and the same below autograd.
TORCH_LIBRARY_IMPL(fastforget_cpu, Autograd, m) {
  m.impl("unlearn_loss", &fastforget::unlearn_loss_autograd<fastforget::Kernels>);
  m.impl("masked_patch_embed_autograd", &fastforget::masked_patch_embed_autograd<fastforget::Kernels>);
  m.impl("qkv_attention", &fastforget::qkv_attention_autograd<fastforget::Kernels>);
  m.impl("group_norm_silu", &fastforget::group_norm_silu_autograd<fastforget::Kernels>);
  m.impl("token_embed", &fastforget::token_embed_autograd<fastforget::Kernels>);
}

TORCH_LIBRARY_IMPL(fastforget_cpu, CPU, m) {
  m.impl("unlearn_loss", &fastforget::unlearn_loss_plain<fastforget::Kernels>);
  m.impl("masked_patch_embed_autograd", &fastforget::masked_patch_embed_dense<fastforget::Kernels>);
  m.impl("qkv_attention", &fastforget::qkv_attention_plain<fastforget::Kernels>);
  m.impl("group_norm_silu", &fastforget::group_norm_silu_plain<fastforget::Kernels>);
  m.impl("token_embed", &fastforget::token_embed_plain<fastforget::Kernels>);
}
