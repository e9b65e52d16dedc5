// Float conversions for the CPU kernels, without torch headers: bf16 and fp16 are carried as raw
// 16-bit words and widened to float for every computation (accumulation is always float32).
#pragma once
#include <cstdint>
#include <cstring>

#include "../common/dtype.h"

namespace fastforget {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_float(uint32_t(x.bits) << 16); }
inline float to_float(f16 x) {
  // IEEE half -> float, exact, branch-free (selects only, so loops over it vectorise): normal
  // halves by re-biasing the exponent with one multiply, subnormals through a magic-number
  // subtraction; infinities and NaNs come out of the multiply.
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  // Signed compares on values below 2^31: SSE/AVX2 have no unsigned 32-bit compare to select with.
  const bool subnormal = int32_t(two_w >> 1) < int32_t(1u << 26);
  return bits_float(sign | (subnormal ? float_bits(denormalized) : float_bits(normalized)));
}

template <typename T> T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16 from_float<bf16>(float f) {
  // Round to nearest even; NaN stays a (quiet) NaN. Branch-free, so loops over it vectorise.
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{uint16_t(nan ? (u >> 16) | 0x40u : rounded)};
}
template <> inline f16 from_float<f16>(float f) {
  // float -> IEEE half, round to nearest even, branch-free: scaling by 2^112 then 2^-110 makes
  // overflow become inf and lets the float unit round; adding a bias of the right exponent leaves
  // the rounded half mantissa in the low bits (gradual underflow included). NaN stays NaN.
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = int32_t(bias >> 1) < 0x38800000 ? 0x71000000u : bias;  // signed compares: see to_float
  const float base = bits_float((bias >> 1) + 0x07800000u) + (bits_float(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const bool nan = int32_t(shl1_w >> 1) > 0x7F800000;
  return f16{uint16_t((sign >> 16) | (nan ? 0x7E00u : nonsign))};
}

// Calls fn with a null pointer of the C++ type that `dtype` names, to pick a template instance.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(static_cast<float*>(nullptr)); break;
    case DType::kFloat16: fn(static_cast<f16*>(nullptr)); break;
    case DType::kBFloat16: fn(static_cast<bf16*>(nullptr)); break;
  }
}

}  // namespace fastforget
