// One block per output row: its threads copy the kept patch's pixels (converted to the parameter
// dtype) into the patch matrix and write bias + position (or cls + its position) into the output
// row, which the GEMM then accumulates onto.
#include "patch_embed.h"
#include "scalar.cuh"

namespace fastforget {
namespace {

constexpr int kThreads = 256;

template <typename I, typename P>
__global__ void __launch_bounds__(kThreads) gather_kernel(PatchEmbedArgs a) {
  const int64_t has_cls = a.cls != nullptr;
  const int64_t tokens = a.keep + has_cls, patch_area = a.patch * a.patch;
  const int64_t features = a.channels * patch_area, grid_w = a.width / a.patch;
  const int64_t r = blockIdx.x, b = r / tokens, t = r % tokens;
  P* patch_row = static_cast<P*>(a.patches) + r * features;
  P* out_row = static_cast<P*>(a.out) + r * a.dim;
  const P* pos = static_cast<const P*>(a.pos);
  if (has_cls && t == 0) {
    const P* cls = static_cast<const P*>(a.cls);
    for (int64_t f = threadIdx.x; f < features; f += kThreads) patch_row[f] = from_f<P>(0.0f);
    for (int64_t d = threadIdx.x; d < a.dim; d += kThreads) out_row[d] = from_f<P>(to_f(cls[d]) + to_f(pos[d]));
    return;
  }
  const int64_t l = a.ids_keep[b * a.keep + t - has_cls];
  const int64_t top = (l / grid_w) * a.patch, left = (l % grid_w) * a.patch;
  const I* image = static_cast<const I*>(a.images) + b * a.channels * a.height * a.width;
  for (int64_t f = threadIdx.x; f < features; f += kThreads) {
    const int64_t c = f / patch_area, i = (f / a.patch) % a.patch, j = f % a.patch;
    patch_row[f] = from_f<P>(to_f(image[(c * a.height + top + i) * a.width + left + j]));
  }
  const P* bias = static_cast<const P*>(a.bias);
  const P* pos_row = pos + (1 + l) * a.dim;
  for (int64_t d = threadIdx.x; d < a.dim; d += kThreads)
    out_row[d] = from_f<P>(to_f(pos_row[d]) + (bias ? to_f(bias[d]) : 0.0f));
}

}  // namespace

cudaError_t launch_gather_patches(const PatchEmbedArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * (a.keep + (a.cls != nullptr));
  dispatch(a.image_dtype, [&](auto* i_tag) {
    dispatch(a.param_dtype, [&](auto* p_tag) {
      using I = std::remove_pointer_t<decltype(i_tag)>;
      using P = std::remove_pointer_t<decltype(p_tag)>;
      gather_kernel<I, P><<<rows, kThreads, 0, stream>>>(a);
    });
  });
  return cudaGetLastError();
}

}  // namespace fastforget
