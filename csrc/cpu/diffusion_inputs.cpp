#include "diffusion_inputs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "scalar.h"
#include "teacher_batch.h"

namespace fastforget {
namespace {

template <typename T, typename N>
void image(const DiffusionInputsArgs& a, int64_t b) {
  const int64_t s = a.positions, c = a.channels, cc = a.cond_channels, width = (cc + c) * s;
  T* student = static_cast<T*>(a.student) + b * width;
  T* teacher = static_cast<T*>(a.teacher) + b * width;
  const T* cond = static_cast<const T*>(a.y_cond) + b * cc * s;
  std::memcpy(student, cond, sizeof(T) * size_t(cc * s));  // the condition, as it is, into both
  std::memcpy(teacher, cond, sizeof(T) * size_t(cc * s));
  const float gamma = a.gammas[b], keep = std::sqrt(gamma), blend = std::sqrt(1.0f - gamma);
  const bool forget = a.is_forget[b] != 0;
  const T* y_0 = static_cast<const T*>(a.y_0) + b * c * s;
  const N* given = a.noise ? static_cast<const N*>(a.noise) + b * c * s : nullptr;
  const uint64_t seed = uint64_t(a.stream[0]), first = uint64_t(a.stream[1]) + uint64_t(b * c * s);
  alignas(64) float eps[kNoiseBlock];
  for (int64_t ch = 0; ch < c; ++ch) {
    const uint8_t* m = a.mask + (b * a.mask_channels + (a.mask_channels == 1 ? 0 : ch)) * s;
    for (int64_t j = 0; j < s; j += kNoiseBlock) {
      const int64_t n = std::min(kNoiseBlock, s - j), at = ch * s + j;
      if (given)
        for (int64_t k = 0; k < n; ++k) eps[k] = to_float(given[at + k]);
      else
        philox_normal_block(first + uint64_t(at), n, seed, eps);
      T* st = student + cc * s + at;
      T* te = teacher + cc * s + at;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const float y = to_float(y_0[at + k]);
        const bool hole = m[j + k] != 0;
        const float x_t = keep * y + blend * eps[k];
        st[k] = from_float<T>(hole ? x_t : y);
        te[k] = from_float<T>(hole ? (forget ? eps[k] : x_t) : y);
      }
    }
  }
}

}  // namespace

void diffusion_inputs_images(const DiffusionInputsArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype(a.dtype, [&](auto* tag) {
    dispatch_dtype(a.noise_dtype, [&](auto* noise_tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using N = std::remove_pointer_t<decltype(noise_tag)>;
      for (int64_t b = begin; b < end; ++b) image<T, N>(a, b);
    });
  });
}

}  // namespace fastforget
