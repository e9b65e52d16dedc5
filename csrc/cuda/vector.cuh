// What the CUDA kernels share beyond scalars: 8-element vector accesses and a deterministic
// block sum.
#pragma once
#include "scalar.cuh"

namespace fastforget {

constexpr int kVec = 8;  // elements a thread moves per access: 16 bytes of a 16-bit dtype

// 8 elements at a 16-byte aligned address: one 16-byte access for 16-bit types, two for float.
// kReadOnly: through the read-only cache (__ldg), only for data no thread of the kernel writes.
template <bool kReadOnly = true, typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[kVec]) {
  if constexpr (sizeof(T) == 2) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    const uint4 raw = kReadOnly ? __ldg(q) : *q;
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = to_f(e[j]);
  } else {
    const float4* q = reinterpret_cast<const float4*>(p);
    const float4 a = kReadOnly ? __ldg(q) : q[0];
    const float4 b = kReadOnly ? __ldg(q + 1) : q[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[kVec]) {
  if constexpr (sizeof(T) == 2) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) e[j] = from_f<T>(v[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// Sum over the block in a fixed order (warp shuffles, then the warps' sums): deterministic.
template <typename V, int kBlock>
__device__ V block_sum(V x) {
  __shared__ V warp_sums[kBlock / 32];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = threadIdx.x < kBlock / 32 ? warp_sums[threadIdx.x] : V(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;  // valid in thread 0
}

}  // namespace fastforget
