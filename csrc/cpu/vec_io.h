// kLanes values of a float, bf16 or fp16 array as one float vector, and a vector's sum in a fixed
// order: what the CPU kernels over rows of any dtype share.
#pragma once
#include "scalar.h"
#include "vec.h"

namespace fastforget {

template <typename T>
inline vec load(const T* p) {
  vec v;
  for (int j = 0; j < kLanes; ++j) v[j] = to_float(p[j]);
  return v;
}

template <typename T>
inline void store(T* p, vec v) {
  for (int j = 0; j < kLanes; ++j) p[j] = from_float<T>(v[j]);
}

inline float lane_sum(vec v) {  // a fixed pairwise order
  float t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = v[j];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

}  // namespace fastforget
