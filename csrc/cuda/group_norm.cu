// GroupNorm + scale-shift + SiLU: one block per (image, group) pair, whose channels are one
// contiguous block of x. Forward takes the statistics in one read (sums of x - x[0]: shifted, so a
// large mean does not cancel the variance away) and writes y channel by channel with the channel's
// affine folded into one multiply-add; backward reads x and dy once for the per-channel sums and
// once more for dx. 16-byte accesses where every channel starts 16-byte aligned. Sums in float32,
// reduced in a fixed order: deterministic.
#include "group_norm.h"
#include "vector.cuh"

namespace fastforget {
namespace {

constexpr int kThreads = 256;

// W consecutive elements: 8 in one or two 16-byte accesses, or 1.
template <int W, typename T>
__device__ __forceinline__ void load_w(const T* p, float (&v)[W]) {
  if constexpr (W == kVec) load8(p, v);
  else v[0] = to_f(*p);
}

template <int W, typename T>
__device__ __forceinline__ void store_w(T* p, const float (&v)[W]) {
  if constexpr (W == kVec) store8(p, v);
  else *p = from_f<T>(v[0]);
}

__device__ __forceinline__ float silu_slope(float z) {  // d/dz z sigmoid(z)
  const float sg = 1.0f / (1.0f + expf(-z));
  return sg * (1.0f + z * (1.0f - sg));
}

// Sum over the block, in every thread.
__device__ __forceinline__ float block_total(float x) {
  __shared__ float total;
  x = block_sum<float, kThreads>(x);
  if (threadIdx.x == 0) total = x;
  __syncthreads();
  const float t = total;
  __syncthreads();  // total is rewritten by the next call
  return t;
}

struct Channel {
  float w, bias, film, shift;  // weight, bias, 1 + scale, shift
};

__device__ __forceinline__ Channel channel(const GroupNormArgs& a, int64_t image, int64_t c) {
  const float* w = static_cast<const float*>(a.weight);
  const float* b = static_cast<const float*>(a.bias);
  const float* scale = static_cast<const float*>(a.scale);
  const float* shift = static_cast<const float*>(a.shift);
  const int64_t bc = image * a.channels + c;
  return Channel{w ? w[c] : 1.0f, b ? b[c] : 0.0f, 1.0f + (scale ? scale[bc] : 0.0f), shift ? shift[bc] : 0.0f};
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) forward_kernel(GroupNormArgs a) {
  const int64_t pair = blockIdx.x, image = pair / a.groups, per_group = a.channels / a.groups;
  const int64_t s = a.positions, n = per_group * s;
  const T* x = static_cast<const T*>(a.x) + pair * n;
  T* y = static_cast<T*>(a.y) + pair * n;
  const float pivot = to_f(x[0]);
  float sum = 0.0f, squares = 0.0f;
  for (int64_t i = int64_t(threadIdx.x) * W; i < n; i += int64_t(kThreads) * W) {
    float v[W];
    load_w<W>(x + i, v);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float d = v[j] - pivot;
      sum += d;
      squares += d * d;
    }
  }
  const float shifted_mean = block_total(sum) / float(n);
  const float var = fmaxf(block_total(squares) / float(n) - shifted_mean * shifted_mean, 0.0f);
  const float mean = pivot + shifted_mean, rstd = 1.0f / sqrtf(var + a.eps);
  if (threadIdx.x == 0) {
    a.mean[pair] = mean;
    a.rstd[pair] = rstd;
  }
  for (int64_t k = 0; k < per_group; ++k) {
    const Channel ch = channel(a, image, (pair % a.groups) * per_group + k);
    const float mul = rstd * ch.w * ch.film, add = ch.bias * ch.film + ch.shift;
    for (int64_t i = k * s + int64_t(threadIdx.x) * W; i < (k + 1) * s; i += int64_t(kThreads) * W) {
      float v[W];
      load_w<W>(x + i, v);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float z = (v[j] - mean) * mul + add;
        v[j] = a.silu ? z / (1.0f + expf(-z)) : z;
      }
      store_w<W>(y + i, v);
    }
  }
}

// dz = dy act'(z) at one element, with its x_hat and n = x_hat w + bias: both passes' recomputation.
__device__ __forceinline__ float dz_at(float x, float dy, float mean, float rstd, const Channel& ch, bool silu,
                                       float& xhat, float& nv) {
  xhat = (x - mean) * rstd;
  nv = xhat * ch.w + ch.bias;
  return silu ? dy * silu_slope(nv * ch.film + ch.shift) : dy;
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) backward_kernel(GroupNormArgs a) {
  const int64_t pair = blockIdx.x, image = pair / a.groups, per_group = a.channels / a.groups;
  const int64_t s = a.positions, n = per_group * s;
  const T* x = static_cast<const T*>(a.x) + pair * n;
  const T* dy = static_cast<const T*>(a.dy) + pair * n;
  T* dx = static_cast<T*>(a.dx) + pair * n;
  const float mean = a.mean[pair], rstd = a.rstd[pair];
  float group_dn_w = 0.0f, group_dn_w_xhat = 0.0f;  // sums over the group of dn w and dn w x_hat
  for (int64_t k = 0; k < per_group; ++k) {  // pass 1: the per-channel and per-group sums
    const int64_t c = (pair % a.groups) * per_group + k;
    const Channel ch = channel(a, image, c);
    float s_dz = 0.0f, s_dz_n = 0.0f, s_dz_xhat = 0.0f;
    for (int64_t i = k * s + int64_t(threadIdx.x) * W; i < (k + 1) * s; i += int64_t(kThreads) * W) {
      float xv[W], gv[W];
      load_w<W>(x + i, xv);
      load_w<W>(dy + i, gv);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float xhat, nv;
        const float dz = dz_at(xv[j], gv[j], mean, rstd, ch, a.silu, xhat, nv);
        s_dz += dz;
        s_dz_n += dz * nv;
        s_dz_xhat += dz * xhat;
      }
    }
    const float dz_sum = block_total(s_dz), dz_n = block_total(s_dz_n);
    const float dn_xhat = block_total(s_dz_xhat) * ch.film, dn = dz_sum * ch.film;  // dn = dz (1 + scale)
    if (threadIdx.x == 0) {
      const int64_t bc = image * a.channels + c;
      a.d_weight[bc] = dn_xhat;
      a.d_bias[bc] = dn;
      a.d_scale[bc] = dz_n;
      a.d_shift[bc] = dz_sum;
    }
    group_dn_w += dn * ch.w;
    group_dn_w_xhat += dn_xhat * ch.w;
  }
  const float mean_dn_w = group_dn_w / float(n), mean_dn_w_xhat = group_dn_w_xhat / float(n);
  for (int64_t k = 0; k < per_group; ++k) {  // pass 2: dx = rstd (dn w - mean(dn w) - x_hat mean(dn w x_hat))
    const Channel ch = channel(a, image, (pair % a.groups) * per_group + k);
    const float dn_w = ch.film * ch.w;
    for (int64_t i = k * s + int64_t(threadIdx.x) * W; i < (k + 1) * s; i += int64_t(kThreads) * W) {
      float xv[W], gv[W];
      load_w<W>(x + i, xv);
      load_w<W>(dy + i, gv);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float xhat, nv;
        const float dz = dz_at(xv[j], gv[j], mean, rstd, ch, a.silu, xhat, nv);
        xv[j] = (dz * dn_w - mean_dn_w - xhat * mean_dn_w_xhat) * rstd;
      }
      store_w<W>(dx + i, xv);
    }
  }
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Vector accesses when every channel of every pair starts on a 16-byte boundary.
template <typename Kernel8, typename Kernel1>
cudaError_t launch(const GroupNormArgs& a, bool vector, Kernel8 k8, Kernel1 k1, cudaStream_t stream) {
  const dim3 grid(unsigned(a.batch * a.groups));
  if (vector && a.positions % kVec == 0) k8<<<grid, kThreads, 0, stream>>>(a);
  else k1<<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_group_norm_forward(const GroupNormArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch(a.x_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    err = launch(a, aligned(a.x) && aligned(a.y), forward_kernel<T, kVec>, forward_kernel<T, 1>, stream);
  });
  return err;
}

cudaError_t launch_group_norm_backward(const GroupNormArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch(a.x_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    err = launch(a, aligned(a.x) && aligned(a.dy) && aligned(a.dx), backward_kernel<T, kVec>,
                 backward_kernel<T, 1>, stream);
  });
  return err;
}

}  // namespace fastforget
