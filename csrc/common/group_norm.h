// GroupNorm, scale-shift and SiLU's arguments, shared by the CPU and CUDA kernels:
//
//   y = act(GN(x; weight, bias) * (1 + scale) + shift),   act = SiLU or the identity
//
// x (batch, channels, positions) contiguous, so an (image, group) pair is one contiguous block of
// channels / groups * positions elements; or, channels_last, (batch, positions, channels): an
// image is still one block, each position a run of its channels (the CPU kernels take both).
// Forward saves each pair's mean and rstd (float32); backward recomputes x_hat and the
// activation's slope from them.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastforget {

struct GroupNormArgs {
  const void* x; DType x_dtype;        // y, dx and dy share x's dtype
  const void* weight; const void* bias; DType param_dtype;  // (channels,) or null
  const void* scale; const void* shift; DType film_dtype;   // (batch, channels) or null
  int64_t batch, channels, positions, groups;
  bool channels_last;                  // x, y, dy and dx (batch, positions, channels)
  float eps;
  bool silu;
  float* mean; float* rstd;            // (batch, groups): written by forward, read by backward
  void* y;                             // forward's output
  const void* dy; void* dx;            // backward's
  // backward's sums per (image, channel), float: of dn * x_hat and dn (the weight's and bias's
  // gradients before the sum over images), of dz * n and dz (scale's and shift's gradients)
  float* d_weight; float* d_bias; float* d_scale; float* d_shift;
};

}  // namespace fastforget
