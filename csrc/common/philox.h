// fastforget's noise stream: Philox4x32-10 (Salmon et al., SC'11) keyed by a 64-bit seed and
// counted by element index, so every backend draws the same noise for the same seed, with no
// state to carry. The Triton kernels (kernels/teacher_batch.py) and the PyTorch reference
// (fastforget/ops/reference.py) implement the same three functions.
//   normal: element i takes pair p = i >> 1 of Philox(p); lanes (0, 1) for even i, (2, 3) for odd;
//           Box-Muller z = sqrt(-2 ln u1) cos(2 pi u2), u1 = (a >> 8 + 1) 2^-24, u2 = (b >> 8) 2^-24.
//   uniform: element i takes lane i & 3 of Philox(i >> 2), u = (r >> 8) 2^-24 in [0, 1).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FF_PHILOX_INLINE __host__ __device__ __forceinline__
#else
#define FF_PHILOX_INLINE inline
#endif

namespace fastforget {

struct Philox4 { uint32_t r[4]; };

FF_PHILOX_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
}

FF_PHILOX_INLINE Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi2 = mulhi32(0xCD9E8D57u, c2), lo2 = 0xCD9E8D57u * c2;
    c0 = hi2 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

FF_PHILOX_INLINE float uniform_from_bits(uint32_t r) { return float(r >> 8) * 5.9604644775390625e-8f; }

FF_PHILOX_INLINE float normal_noise(uint64_t i, uint64_t seed) {
  const Philox4 p = philox4x32_10(i >> 1, seed);
  const uint32_t a = (i & 1) ? p.r[2] : p.r[0], b = (i & 1) ? p.r[3] : p.r[1];
  const float u1 = float((a >> 8) + 1) * 5.9604644775390625e-8f;  // (0, 1]: log stays finite
  const float u2 = uniform_from_bits(b);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

FF_PHILOX_INLINE float uniform_noise(uint64_t i, uint64_t seed) {
  const Philox4 p = philox4x32_10(i >> 2, seed);
  const uint32_t lane = uint32_t(i & 3);  // selects, not p.r[lane]: a runtime index puts p on the GPU's stack
  return uniform_from_bits(lane == 0 ? p.r[0] : lane == 1 ? p.r[1] : lane == 2 ? p.r[2] : p.r[3]);
}

}  // namespace fastforget
