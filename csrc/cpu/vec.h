// GCC/Clang vector extensions: 16 floats, one AVX-512 register (two AVX2 ones), written once for
// every ISA; the CPU kernels' shared vector arithmetic.
#pragma once
#include <cstdint>

namespace fastforget {

typedef float vec __attribute__((vector_size(64)));
typedef int32_t ivec __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
inline vec splat(float f) { return vec{} + f; }
inline int64_t vecs(int64_t n) { return (n + kLanes - 1) / kLanes; }

// e^x for x <= 0, branch-free (Cephes' expf): x = k ln2 + r, a polynomial for e^r, 2^k through the
// exponent bits. Below -87 it gives e^-87 (1.6e-38, still a normal float) instead of less: beside
// a sum's largest term, 1, that is the same. NaN stays NaN.
inline vec exp_nonpositive(vec x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const vec shifted = x * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23: k = round(x / ln2) in the low bits
  const vec k = shifted - 12582912.0f;
  const vec r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 in two parts: r exact to float
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * (vec)((((ivec)shifted - 0x4B400000) + 127) << 23);
}

// The logistic sigmoid, branch-free and stable for any x: e = e^-|x|, then 1 / (1 + e) for
// x >= 0 and e / (1 + e) below. Its error is that of exp_nonpositive, a few float ulps.
inline vec sigmoid(vec x) {
  const vec e = exp_nonpositive(x < 0.0f ? x : -x);
  const vec inv = 1.0f / (1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

}  // namespace fastforget
