// The diffusion family's step inputs (Palette's Network.forward with labels), shared by the CPU
// and CUDA kernels. Per image b with noise level gamma_b, for each element of the noisy channels:
//   x_t     = sqrt(gamma) y_0 + sqrt(1 - gamma) eps
//   student = m ? x_t : y_0                      (m x_t + (1 - m) y_0 for a 0/1 mask)
//   teacher = student on retain rows; forget rows m ? eps : y_0 (the hole pure noise)
// and both outputs start with the condition's channels. eps is the given noise tensor, or element
// first + i of fastforget's Philox normal stream (philox.h), i the flat index in y_0.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "philox.h"

namespace fastforget {

struct DiffusionInputsArgs {
  const void* y_0; const void* y_cond; DType dtype;  // (B, C, S), (B, Cc, S) contiguous; outputs' dtype too
  const void* noise; DType noise_dtype;             // (B, C, S) or null: the stream's
  const uint8_t* mask; int64_t mask_channels;       // (B, 1 or C, S), nonzero in the hole
  const float* gammas;                              // (B,)
  const uint8_t* is_forget;                         // (B,)
  const int64_t* stream;                            // (Philox seed, first element), on the device
  void* student; void* teacher;                     // (B, Cc + C, S)
  int64_t batch, channels, cond_channels, positions;
};

}  // namespace fastforget
