// Masked-patch encoding: the kept patches of each image, flattened in Conv2d's (c, i, j) order,
// and the epilogue rows (bias + position embedding; cls + its position) that the GEMM
// out += patches @ weight^T accumulates onto. Shared by the CPU and CUDA kernels.
//
// Row r of the (batch * tokens) output is token t = r % tokens of image b = r / tokens; with a cls
// token, t = 0 is cls (its patch row is zeros) and t >= 1 is kept patch t - 1; without, t is kept
// patch t. Kept patch k of image b is grid cell l = ids_keep[b, k] = gh * grid_w + gw.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastforget {

struct PatchEmbedArgs {
  const void* images; DType image_dtype;  // (batch, channels, height, width) contiguous
  const int64_t* ids_keep;                // (batch, keep) in [0, grid_h * grid_w)
  const void* bias;                       // (dim,) or null; bias, pos, cls and the outputs share param_dtype
  const void* pos;                        // (1 + grid_h * grid_w, dim): the cls position first
  const void* cls;                        // (dim,) or null
  DType param_dtype;
  void* patches;                          // out: (batch * tokens, channels * patch * patch)
  void* out;                              // out: (batch * tokens, dim), the epilogue rows
  int64_t batch, channels, height, width, patch, keep, dim;
};

inline int64_t patch_tokens(const PatchEmbedArgs& a) { return a.keep + (a.cls != nullptr); }
inline int64_t patch_features(const PatchEmbedArgs& a) { return a.channels * a.patch * a.patch; }

}  // namespace fastforget
