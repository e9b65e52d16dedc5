#include "teacher_batch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "scalar.h"

namespace fastforget {
namespace {

template <typename T>
Moments chunk_moments(const T* x, int64_t n) {
  // Two passes over a chunk that sits in cache: the mean, then squared deviations from it. Eight
  // independent double accumulators: the adds overlap (and vectorise) instead of waiting on each
  // other, in a fixed order, so the result is the same at any thread count.
  constexpr int kLanes = 8;
  double sum[kLanes] = {}, m2[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int l = 0; l < kLanes; ++l) sum[l] += to_float(x[i + l]);
  for (int64_t i = body; i < n; ++i) sum[0] += to_float(x[i]);
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += sum[l];
  const double mean = total / double(n);
  for (int64_t i = 0; i < body; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double d = double(to_float(x[i + l])) - mean;
      m2[l] += d * d;
    }
  for (int64_t i = body; i < n; ++i) {
    const double d = double(to_float(x[i])) - mean;
    m2[0] += d * d;
  }
  double deviations = 0.0;
  for (int l = 0; l < kLanes; ++l) deviations += m2[l];
  return Moments{double(n), mean, deviations};
}

template <typename T>
void rows_impl(const TeacherBatchArgs& a, float mean, float std, int64_t row_begin, int64_t row_end) {
  const T* in = static_cast<const T*>(a.images);
  T* out = static_cast<T*>(a.out);
  const float lo = a.clamp ? a.clamp_lo : 0.0f, hi = a.clamp ? a.clamp_hi : 1.0f;
  const float clamp_lo = a.clamp ? a.clamp_lo : -INFINITY, clamp_hi = a.clamp ? a.clamp_hi : INFINITY;
  // value = raw * scale + shift: normal z * std + mean, uniform lo + u (hi - lo), constant mean
  const float scale = a.noise == Noise::kNormal ? std : a.noise == Noise::kUniform ? hi - lo : 0.0f;
  const float shift = a.noise == Noise::kUniform ? lo : mean;
  const uint64_t seed = uint64_t(a.stream[0]), first = uint64_t(a.stream[1]);
  alignas(64) float raw[kNoiseBlock] = {};
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t base = row * a.row_numel;  // 64-bit: batches pass 2^31 elements
    if (!a.is_forget[row]) {  // retain rows: bit for bit
      std::memcpy(out + base, in + base, sizeof(T) * size_t(a.row_numel));
      continue;
    }
    for (int64_t j = 0; j < a.row_numel; j += kNoiseBlock) {
      const int64_t n = std::min(kNoiseBlock, a.row_numel - j);
      if (a.noise != Noise::kConstant) philox_noise_block(a.noise, first + uint64_t(base + j), n, seed, raw);
      T* dst = out + base + j;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const float v = raw[k] * scale + shift;
        dst[k] = from_float<T>(std::min(std::max(v, clamp_lo), clamp_hi));
      }
    }
  }
}

}  // namespace

// Noise in blocks the compiler vectorises: Philox over consecutive counters as plain loops, and
// Box-Muller's log and cos as branch-free polynomials (Cephes' logf and sinf/cosf), since the
// C library's scalar calls cost more than everything else here. Element i of the stream is the
// same value philox.h's normal_noise / uniform_noise give, to within a few float ulps.
inline float log_unit(float u) {  // u in [2^-24, 1]
  const uint32_t bits = float_bits(u);
  float e = float(int32_t(bits >> 23) - 126);
  float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);  // u = m 2^e, m in [0.5, 1)
  const bool low = m < 0.70710678f;
  e = low ? e - 1.0f : e;
  const float x = low ? m + m - 1.0f : m - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z - 2.12194440e-4f * e - 0.5f * z;
  return x + y + 0.693359375f * e;
}

inline float cos_turns(float t) {  // cos(2 pi t), t in [0, 1), the argument rounded as cosf's callers round it
  const float x = 6.283185307179586f * t;
  const float k = float(int(x * 0.63661977236758134f + 0.5f));  // nearest multiple of pi/2: 0..4 (x >= 0)
  const float a = ((x - k * 1.5703125f) - k * 4.837512969970703125e-4f) - k * 7.54978995489188216e-8f;
  const float z = a * a;
  const float sin_a = a + a * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float cos_a = 1.0f - 0.5f * z + z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                                                 4.166664568298827e-2f);
  // quadrants 0..4 (4 is 0): cos, -sin, -cos, sin; float compares and selects only, so loops vectorise
  const float v = (k == 1.0f) | (k == 3.0f) ? sin_a : cos_a;
  const float sign = (k == 1.0f) | (k == 2.0f) ? -1.0f : 1.0f;
  return v * sign;
}

// r[lane][k] = lane of Philox(first + k), k < n.
inline void philox_block(uint64_t first, int64_t n, uint64_t seed, uint32_t (*r)[kNoiseBlock]) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const Philox4 p = philox4x32_10(first + uint64_t(k), seed);
    r[0][k] = p.r[0]; r[1][k] = p.r[1]; r[2][k] = p.r[2]; r[3][k] = p.r[3];
  }
}

// z[0, n) = the raw noise (standard normal, or uniform in [0, 1)) of stream elements [i0, i0 + n).
void philox_noise_block(Noise noise, uint64_t i0, int64_t n, uint64_t seed, float* z) {
  alignas(64) uint32_t r[4][kNoiseBlock];
  if (noise == Noise::kNormal) {  // element i: pair i >> 1, lanes (0, 1) even, (2, 3) odd
    const uint64_t p0 = i0 >> 1;
    const int64_t pairs = int64_t(((i0 + uint64_t(n) - 1) >> 1) - p0 + 1);
    philox_block(p0, pairs, seed, r);
    alignas(64) float half[2][kNoiseBlock], both[2 * kNoiseBlock];
    for (int h = 0; h < 2; ++h) {
#pragma omp simd
      for (int64_t k = 0; k < pairs; ++k)
        half[h][k] = std::sqrt(-2.0f * log_unit(float((r[2 * h][k] >> 8) + 1) * 5.9604644775390625e-8f)) *
                     cos_turns(uniform_from_bits(r[2 * h + 1][k]));
    }
    for (int64_t k = 0; k < pairs; ++k) {
      both[2 * k] = half[0][k];
      both[2 * k + 1] = half[1][k];
    }
    std::memcpy(z, both + (i0 & 1), sizeof(float) * size_t(n));
  } else {  // uniform: element i is lane i & 3 of Philox(i >> 2)
    const uint64_t q0 = i0 >> 2;
    const int64_t quads = int64_t(((i0 + uint64_t(n) - 1) >> 2) - q0 + 1);
    philox_block(q0, quads, seed, r);
    alignas(64) float all[4 * kNoiseBlock];
    for (int64_t k = 0; k < quads; ++k)
      for (int lane = 0; lane < 4; ++lane) all[4 * k + lane] = uniform_from_bits(r[lane][k]);
    std::memcpy(z, all + (i0 & 3), sizeof(float) * size_t(n));
  }
}

void philox_normal_block(uint64_t i0, int64_t n, uint64_t seed, float* z) {
  philox_noise_block(Noise::kNormal, i0, n, seed, z);
}

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
