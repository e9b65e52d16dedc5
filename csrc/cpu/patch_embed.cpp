#include "patch_embed.h"

#include <cstring>
#include <type_traits>

#include "scalar.h"

namespace fastforget {
namespace {

template <typename I, typename P>
void rows_impl(const PatchEmbedArgs& a, int64_t row_begin, int64_t row_end) {
  const I* images = static_cast<const I*>(a.images);
  const P* bias = static_cast<const P*>(a.bias);
  const P* pos = static_cast<const P*>(a.pos);
  const P* cls = static_cast<const P*>(a.cls);
  P* patches = static_cast<P*>(a.patches);
  P* out = static_cast<P*>(a.out);
  const int64_t tokens = patch_tokens(a), features = patch_features(a), grid_w = a.width / a.patch;
  const int64_t has_cls = cls != nullptr;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t b = r / tokens, t = r % tokens;
    P* patch_row = patches + r * features;
    P* out_row = out + r * a.dim;
    if (has_cls && t == 0) {
      std::memset(static_cast<void*>(patch_row), 0, sizeof(P) * size_t(features));
      for (int64_t d = 0; d < a.dim; ++d) out_row[d] = from_float<P>(to_float(cls[d]) + to_float(pos[d]));
      continue;
    }
    const int64_t l = a.ids_keep[b * a.keep + t - has_cls];
    const int64_t top = (l / grid_w) * a.patch, left = (l % grid_w) * a.patch;
    for (int64_t c = 0; c < a.channels; ++c)
      for (int64_t i = 0; i < a.patch; ++i) {
        const I* src = images + ((b * a.channels + c) * a.height + top + i) * a.width + left;
        P* dst = patch_row + (c * a.patch + i) * a.patch;
        for (int64_t j = 0; j < a.patch; ++j) dst[j] = from_float<P>(to_float(src[j]));
      }
    const P* pos_row = pos + (1 + l) * a.dim;
    for (int64_t d = 0; d < a.dim; ++d)
      out_row[d] = from_float<P>(to_float(pos_row[d]) + (bias ? to_float(bias[d]) : 0.0f));
  }
}

}  // namespace

void gather_patches(const PatchEmbedArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch_dtype(args.image_dtype, [&](auto* i_tag) {
    dispatch_dtype(args.param_dtype, [&](auto* p_tag) {
      rows_impl<std::remove_pointer_t<decltype(i_tag)>, std::remove_pointer_t<decltype(p_tag)>>(args, row_begin,
                                                                                                 row_end);
    });
  });
}

}  // namespace fastforget
