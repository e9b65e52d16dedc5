#include "teacher_batch.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "scalar.h"

namespace fastforget {
namespace {

template <typename T>
Moments chunk_moments(const T* x, int64_t n) {
  // Two passes over a chunk that sits in cache: the mean, then squared deviations from it.
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += to_float(x[i]);
  const double mean = sum / double(n);
  double m2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(to_float(x[i])) - mean;
    m2 += d * d;
  }
  return Moments{double(n), mean, m2};
}

template <typename T>
void rows_impl(const TeacherBatchArgs& a, float mean, float std, int64_t row_begin, int64_t row_end) {
  const T* in = static_cast<const T*>(a.images);
  T* out = static_cast<T*>(a.out);
  const float lo = a.clamp ? a.clamp_lo : 0.0f, hi = a.clamp ? a.clamp_hi : 1.0f;
  const uint64_t seed = uint64_t(a.stream[0]), first = uint64_t(a.stream[1]);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * a.row_numel;
    if (!a.is_forget[row]) {  // retain rows: bit for bit
      std::memcpy(out + base, in + base, sizeof(T) * size_t(a.row_numel));
      continue;
    }
    for (int64_t j = 0; j < a.row_numel; ++j) {
      float v = noise_value(a.noise, first + uint64_t(base + j), seed, mean, std, lo, hi);
      if (a.clamp) v = std::min(std::max(v, a.clamp_lo), a.clamp_hi);
      out[base + j] = from_float<T>(v);
    }
  }
}

}  // namespace

void teacher_batch_moments(const void* images, DType dtype, int64_t numel, int64_t chunk_begin, int64_t chunk_end,
                           Moments* moments) {
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const int64_t begin = c * kStatsChunk, n = std::min(kStatsChunk, numel - begin);
      moments[c] = chunk_moments(static_cast<const T*>(images) + begin, n);
    }
  });
}

void teacher_batch_rows(const TeacherBatchArgs& args, float mean, float std, int64_t row_begin, int64_t row_end) {
  dispatch_dtype(args.dtype, [&](auto* tag) {
    rows_impl<std::remove_pointer_t<decltype(tag)>>(args, mean, std, row_begin, row_end);
  });
}

}  // namespace fastforget
