// The teacher batch: retain rows copied, forget rows replaced by noise, then clamped. Shared by
// the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "philox.h"

namespace fastforget {

enum class Noise : int { kNormal = 0, kUniform = 1, kConstant = 2 };

struct TeacherBatchArgs {
  const void* images; void* out; DType dtype;  // (rows, row_numel) contiguous, one dtype
  const uint8_t* is_forget;                    // (rows,), nonzero = forget row
  int64_t rows, row_numel;
  const int64_t* stream;                       // (Philox seed, flat index of the first element), on the device
  Noise noise;
  bool clamp; float clamp_lo, clamp_hi;        // uniform noise spans [lo, hi) (or [0, 1) unclamped)
};

// A chunk's statistics: count, mean, and M2 = sum of squared deviations from the mean.
struct Moments { double count, mean, m2; };

// Chan et al.'s pairwise merge: exact in any grouping, stable where sum-of-squares is not.
FF_PHILOX_INLINE Moments merge(Moments a, Moments b) {
  const double n = a.count + b.count;
  if (n == 0) return a;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + delta * b.count / n, a.m2 + b.m2 + delta * delta * a.count * b.count / n};
}

// The value of a forget row's element i (flat index in the batch) before clamping; mean and std
// are the whole batch's (std unbiased, as torch.std).
FF_PHILOX_INLINE float noise_value(Noise noise, uint64_t i, uint64_t seed, float mean, float std, float lo,
                                   float hi) {
  switch (noise) {
    case Noise::kNormal: return normal_noise(i, seed) * std + mean;
    case Noise::kUniform: return lo + uniform_noise(i, seed) * (hi - lo);
    default: return mean;
  }
}

}  // namespace fastforget
