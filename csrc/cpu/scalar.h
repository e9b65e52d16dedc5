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
  // IEEE half -> float, exact; subnormal halves are rescaled through the float unit.
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    const float mag = float(man) * 5.9604644775390625e-8f;  // man * 2^-24
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

template <typename T> T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16 from_float<bf16>(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}
template <> inline f16 from_float<f16>(float f) {
  // float -> IEEE half, round to nearest even, with overflow to inf and gradual underflow.
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below the smallest normal half: 2^-14
    const float mag = bits_float(abs) * 16777216.0f;  // in units of 2^-24
    const uint32_t q = uint32_t(mag);
    const float rem = mag - float(q);
    const uint32_t r = (rem > 0.5f || (rem == 0.5f && (q & 1u))) ? q + 1 : q;
    return f16{uint16_t(sign | r)};
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return f16{uint16_t(sign | (((rounded >> 13) - (112u << 10)) & 0x7fffu))};
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
