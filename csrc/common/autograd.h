// Autograd of the native ops in C++: an eager call from Python goes into one dispatcher call that
// records the graph, and backward runs without Python. (Through a Python autograd.Function the
// bookkeeping costs ~25 us a call on the host, several times a small kernel.) Included by the
// bindings files; K is the extension's kernels:
//   K::unlearn_loss_forward, K::unlearn_loss_scale_grad   (both extensions)
//   K::masked_patch_embed                                 (both)
//   K::qkv_attention_forward, K::qkv_attention_backward   (the CPU's only)
//   K::token_embed_forward, K::token_embed_backward       (both)
#pragma once
#include <torch/torch.h>

#include <optional>

#include "bindings.h"

namespace fastforget {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The schemas the Python eager path calls (the forward kernels' schemas are in bindings.h).
constexpr const char* kUnlearnLossSchema =
    "unlearn_loss(Tensor[] students, Tensor[] retain_targets, Tensor[] forget_targets, Tensor is_forget, "
    "float retain_weight, float forget_weight, int normalize) -> (Tensor, Tensor, Tensor)";
constexpr const char* kMaskedPatchEmbedAutogradSchema =
    "masked_patch_embed_autograd(Tensor images, Tensor weight, Tensor? bias, Tensor pos_embed, Tensor ids_keep, "
    "Tensor? cls_token) -> Tensor";
constexpr const char* kTokenEmbedSchema =
    "token_embed(Tensor tokens, Tensor keep, Tensor masked, Tensor word_weight, Tensor pos_weight, Tensor ln_weight, "
    "Tensor ln_bias, int class_id, int mask_id, float eps) -> Tensor";
constexpr const char* kAttentionSchema = "qkv_attention(Tensor qkv, int heads) -> Tensor";
constexpr const char* kGroupNormSchema =
    "group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int groups, float eps, "
    "bool silu) -> Tensor";

inline std::optional<at::Tensor> defined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The loss's gradients are written by the forward kernel; backward rescales them in place
// (skipped on the device when the scale is 1) and hands them on. They are consumed: a second
// backward through the graph is refused by the saved variables' version check, as the Python
// path's is. autograd counts the lists' tensors one by one: backward returns a gradient for each
// student, then nothing for the targets, is_forget and the four numbers.
template <class K>
struct UnlearnLossFunction : torch::autograd::Function<UnlearnLossFunction<K>> {
  static variable_list forward(AutogradContext* ctx, at::TensorList students, at::TensorList retains,
                               at::TensorList forgets, const at::Tensor& is_forget, double retain_weight,
                               double forget_weight, int64_t normalize, bool compute_grad) {
    auto [loss, retain_loss, forget_loss, grads] = K::unlearn_loss_forward(
        students, retains, forgets, is_forget, retain_weight, forget_weight, normalize, compute_grad);
    grads.push_back(is_forget);
    ctx->save_for_backward(grads);
    ctx->saved_data["retain_weight"] = retain_weight;
    ctx->saved_data["forget_weight"] = forget_weight;
    ctx->saved_data["tensors"] = int64_t(students.size());
    ctx->set_materialize_grads(false);  // unused outputs give undefined gradients, not zero tensors
    return {loss, retain_loss, forget_loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor is_forget = saved.back();
    saved.pop_back();
    K::unlearn_loss_scale_grad(saved, is_forget, defined(grads[0]), defined(grads[1]), defined(grads[2]),
                               ctx->saved_data["retain_weight"].toDouble(),
                               ctx->saved_data["forget_weight"].toDouble());
    for (const at::Tensor& g : saved) torch::autograd::impl::bump_version(g);  // written through pointers
    const int64_t n = ctx->saved_data["tensors"].toInt();
    saved.resize(3 * n + 1 + 4);  // the targets, is_forget and the numbers get none
    return saved;
  }
};

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> unlearn_loss_autograd(
    at::TensorList students, at::TensorList retains, at::TensorList forgets, const at::Tensor& is_forget,
    double retain_weight, double forget_weight, int64_t normalize) {
  bool compute_grad = false;  // forward runs without grad mode: decided here
  for (const at::Tensor& s : students) compute_grad |= s.requires_grad();
  compute_grad &= at::GradMode::is_enabled();
  auto out = UnlearnLossFunction<K>::apply(students, retains, forgets, is_forget, retain_weight, forget_weight,
                                           normalize, compute_grad);
  return {out[0], out[1], out[2]};
}

// (B, K, C p p): the kept patches in Conv2d's (c, i, j) order, read from a strided view: the same
// tensor ops as the Python backward (fastforget/ops/patch_embed.py), so the same numbers.
inline at::Tensor gather_kept_patches(const at::Tensor& images, const at::Tensor& ids_keep, int64_t patch) {
  const int64_t batch = images.size(0), height = images.size(2), width = images.size(3), grid_w = width / patch;
  const at::Tensor cells =
      images.unflatten(2, {height / patch, patch}).unflatten(4, {grid_w, patch}).permute({0, 2, 4, 1, 3, 5});
  const at::Tensor rows = at::arange(batch, ids_keep.options()).unsqueeze(1);
  return cells.index({rows, ids_keep.div(grid_w, "floor"), ids_keep.remainder(grid_w)})
      .reshape({batch, ids_keep.size(1), -1});
}

// The kernels take dense row-major tensors: copies only where the caller's are not.
template <class K>
at::Tensor masked_patch_embed_dense(const at::Tensor& images, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& pos,
                                    const at::Tensor& ids_keep, const std::optional<at::Tensor>& cls) {
  auto dense = [](const std::optional<at::Tensor>& t) { return t ? std::optional(t->contiguous()) : t; };
  return K::masked_patch_embed(images.contiguous(), weight.contiguous(), dense(bias), pos.contiguous(),
                               ids_keep.contiguous(), dense(cls));
}

// The parameters' gradients from the kept patches (images get none): the weight's a GEMM with the
// re-gathered patches, the positions' a GEMM with the one-hot matrix of the kept ids (no scatter-add
// atomics: deterministic on every device), float32 sums cast to the parameters' dtype.
template <class K>
struct MaskedPatchEmbedFunction : torch::autograd::Function<MaskedPatchEmbedFunction<K>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& images, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& pos, const at::Tensor& ids_keep,
                            const std::optional<at::Tensor>& cls) {
    ctx->save_for_backward({images, ids_keep});
    ctx->saved_data["weight_shape"] = weight.sizes();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_cls"] = cls.has_value();
    ctx->saved_data["length"] = pos.size(1) - 1;
    return masked_patch_embed_dense<K>(images, weight, bias, pos, ids_keep, cls);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &images = saved[0], &ids_keep = saved[1], &grad = grads[0];
    const auto weight_shape = ctx->saved_data["weight_shape"].toIntVector();
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), has_cls = ctx->saved_data["has_cls"].toBool();
    const int64_t length = ctx->saved_data["length"].toInt(), dim = weight_shape[0];
    const int64_t batch = ids_keep.size(0), keep = ids_keep.size(1);
    const at::Tensor g = has_cls ? grad.slice(1, 1) : grad;  // (B, K, D): the patch tokens
    // needs_input_grad counts tensor arguments only: images, weight, [bias], pos, ids_keep, [cls]
    const int64_t pos_edge = 2 + has_bias, cls_edge = 4 + has_bias;
    at::Tensor d_weight, d_bias, d_pos, d_cls;
    if (ctx->needs_input_grad(1)) {
      const at::Tensor patches = gather_kept_patches(images, ids_keep, weight_shape[3]).to(grad.scalar_type());
      d_weight = g.reshape({-1, dim}).t().matmul(patches.reshape({batch * keep, -1})).view(weight_shape);
    }
    if (ctx->needs_input_grad(2) && has_bias) d_bias = g.to(at::kFloat).sum({0, 1}).to(grad.scalar_type());
    const at::Tensor cls_sum = has_cls ? grad.select(1, 0).to(at::kFloat).sum(0) : at::Tensor();
    if (ctx->needs_input_grad(pos_edge)) {
      const at::Tensor one_hot = at::one_hot(ids_keep.reshape(-1), length).to(grad.scalar_type());
      const at::Tensor d_patches = one_hot.t().matmul(g.reshape({-1, dim})).to(at::kFloat);
      const at::Tensor d_cls_pos = has_cls ? cls_sum : at::zeros({dim}, grad.options().dtype(at::kFloat));
      d_pos = at::cat({d_cls_pos.unsqueeze(0), d_patches}).unsqueeze(0).to(grad.scalar_type());
    }
    if (has_cls && ctx->needs_input_grad(cls_edge)) d_cls = cls_sum.view({1, 1, dim}).to(grad.scalar_type());
    return {at::Tensor(), d_weight, d_bias, d_pos, at::Tensor(), d_cls};
  }
};

template <class K>
at::Tensor masked_patch_embed_autograd(const at::Tensor& images, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& pos,
                                       const at::Tensor& ids_keep, const std::optional<at::Tensor>& cls) {
  return MaskedPatchEmbedFunction<K>::apply(images, weight, bias, pos, ids_keep, cls);
}

// Attention's backward recomputes the probabilities from each row's log-sum-exp.
template <class K>
struct AttentionFunction : torch::autograd::Function<AttentionFunction<K>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, int64_t heads) {
    const at::Tensor dense = qkv.contiguous();
    auto [out, lse] = K::qkv_attention_forward(dense, heads);
    ctx->save_for_backward({dense, out, lse});
    ctx->saved_data["heads"] = heads;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {K::qkv_attention_backward(grads[0].contiguous(), saved[0], saved[1], saved[2],
                                      ctx->saved_data["heads"].toInt()),
            at::Tensor()};
  }
};

template <class K>
at::Tensor qkv_attention_autograd(const at::Tensor& qkv, int64_t heads) {
  return AttentionFunction<K>::apply(qkv, heads);
}

// GroupNorm + scale-shift + SiLU: backward recomputes from x and the saved per-group statistics.
// The kernel takes dense tensors; the gradients come back for the tensors given, in order.
template <class K>
struct GroupNormFunction : torch::autograd::Function<GroupNormFunction<K>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu) {
    auto dense = [](const std::optional<at::Tensor>& t) { return t ? std::optional(t->contiguous()) : t; };
    const at::Tensor xd = is_channels_last(x) ? x : x.contiguous();  // channels last stays so
    auto [y, mean, rstd] = K::group_norm_silu_forward(xd, dense(weight), dense(bias), dense(scale), dense(shift),
                                                      groups, eps, silu);
    auto saved = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };
    ctx->save_for_backward({xd, saved(weight), saved(bias), saved(scale), saved(shift), mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto given = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t.contiguous()) : std::nullopt; };
    const at::MemoryFormat format = is_channels_last(saved[0]) ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous;
    const std::vector<at::Tensor> present = K::group_norm_silu_backward(
        grads[0].contiguous(format), saved[0], given(saved[1]), given(saved[2]), given(saved[3]), given(saved[4]), saved[5],
        saved[6], ctx->saved_data["groups"].toInt(), ctx->saved_data["silu"].toBool());
    variable_list out{present[0]};  // then one per optional argument, undefined where it was not given
    size_t next = 1;
    for (int i = 1; i <= 4; ++i) out.push_back(saved[i].defined() ? present[next++] : at::Tensor());
    out.resize(8);  // groups, eps, silu get none
    return out;
  }
};

template <class K>
at::Tensor group_norm_silu_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu) {
  return GroupNormFunction<K>::apply(x, weight, bias, scale, shift, groups, eps, silu);
}

// MAGE's token embedding: backward recomputes each row from the ids and the saved statistics.
template <class K>
struct TokenEmbedFunction : torch::autograd::Function<TokenEmbedFunction<K>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& keep,
                            const at::Tensor& masked, const at::Tensor& word, const at::Tensor& pos,
                            const at::Tensor& ln_weight, const at::Tensor& ln_bias, int64_t class_id, int64_t mask_id,
                            double eps) {
    const at::Tensor t = tokens.contiguous(), k = keep.contiguous(), m = masked.contiguous(), w = word.contiguous(),
                     p = pos.contiguous(), lw = ln_weight.contiguous();
    auto [out, mean, rstd] = K::token_embed_forward(t, k, m, w, p, lw, ln_bias.contiguous(), class_id, mask_id, eps);
    ctx->save_for_backward({t, k, m, w, p, lw, mean, rstd});
    ctx->saved_data["class_id"] = class_id;
    ctx->saved_data["mask_id"] = mask_id;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [d_word, d_pos, d_ln_weight, d_ln_bias] =
        K::token_embed_backward(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                                ctx->saved_data["class_id"].toInt(), ctx->saved_data["mask_id"].toInt());
    // needs_input_grad counts tensor arguments: tokens, keep, masked, then the four weights
    auto needed = [&](int i, const at::Tensor& g) { return ctx->needs_input_grad(i) ? g : at::Tensor(); };
    return {at::Tensor(), at::Tensor(), at::Tensor(), needed(3, d_word), needed(4, d_pos), needed(5, d_ln_weight),
            needed(6, d_ln_bias), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <class K>
at::Tensor token_embed_autograd(const at::Tensor& tokens, const at::Tensor& keep, const at::Tensor& masked,
                                const at::Tensor& word, const at::Tensor& pos, const at::Tensor& ln_weight,
                                const at::Tensor& ln_bias, int64_t class_id, int64_t mask_id, double eps) {
  return TokenEmbedFunction<K>::apply(tokens, keep, masked, word, pos, ln_weight, ln_bias, class_id, mask_id, eps);
}

template <class K>
at::Tensor token_embed_plain(const at::Tensor& tokens, const at::Tensor& keep, const at::Tensor& masked,
                             const at::Tensor& word, const at::Tensor& pos, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, int64_t class_id, int64_t mask_id, double eps) {
  return std::get<0>(K::token_embed_forward(tokens.contiguous(), keep.contiguous(), masked.contiguous(),
                                            word.contiguous(), pos.contiguous(), ln_weight.contiguous(),
                                            ln_bias.contiguous(), class_id, mask_id, eps));
}

// The same ops below autograd (inference mode, where the Autograd kernels are skipped).
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> unlearn_loss_plain(
    at::TensorList students, at::TensorList retains, at::TensorList forgets, const at::Tensor& is_forget,
    double retain_weight, double forget_weight, int64_t normalize) {
  auto out = K::unlearn_loss_forward(students, retains, forgets, is_forget, retain_weight, forget_weight, normalize,
                                     false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

template <class K>
at::Tensor qkv_attention_plain(const at::Tensor& qkv, int64_t heads) {
  return std::get<0>(K::qkv_attention_forward(qkv.contiguous(), heads));
}

template <class K>
at::Tensor group_norm_silu_plain(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu) {
  auto dense = [](const std::optional<at::Tensor>& t) { return t ? std::optional(t->contiguous()) : t; };
  return std::get<0>(K::group_norm_silu_forward(is_channels_last(x) ? x : x.contiguous(), dense(weight),
                                                dense(bias), dense(scale), dense(shift), groups, eps, silu));
}

}  // namespace fastforget
