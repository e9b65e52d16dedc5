// MAGE's token embedding: each row of the output is one group of threads (blockDim.x, 8
// elements a thread: 16-byte accesses where rows are 16-byte aligned), blockDim.y rows a block.
// Forward sums the word and position rows in registers, takes the statistics in two reductions
// (mean, then squared deviations) and writes the row. Backward is deterministic, with no atomics:
//   1. backward_kernel recomputes each row, runs LayerNorm's backward and writes the row's dx
//      (float32) and its two keys (the word row and the position row it read); the LayerNorm
//      parameters' sums stay in registers over a block's rows, are summed over its groups in group
//      order and written once a block (the blocks' partials are summed in block order);
//   2. the bindings sort the keys (stable: rows in row order within a key) and find each weight
//      row's segment of sources with searchsorted, on the device, in fixed shapes;
//   3. segment_sum_kernel gives each (weight row, column tile) one block, which sums its sources'
//      dx in a fixed order (warp w takes every kSegWarps-th source from the w-th, in order; the
//      warps' sums are added in warp order) and writes the gradient row in the weights' dtype.
// Every sum has a fixed order, so the gradients repeat bit for bit from run to run.
#include "token_embed.h"

#include <algorithm>
#include <type_traits>

#include "vector.cuh"

namespace fastforget {
namespace {

constexpr int kMaxGroups = 16, kMaxWarps = 16;  // rows a block; warps a row (512 threads)
constexpr int kRowsPerGroup = 4;                // backward: rows a group walks, summing the parameters' gradients

__device__ __forceinline__ float2 warp_sum(float2 v) {  // butterfly: every lane gets the same bits
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over this row's threads (threadIdx.y's group), in a fixed order, in every one of them.
// Every thread of the block calls it (it may wait at the block's barriers).
__device__ __forceinline__ float2 row_sum(float2 v) {
  __shared__ float2 red[kMaxGroups][kMaxWarps];
  v = warp_sum(v);
  const int warps = blockDim.x / 32;
  if (warps == 1) return v;
  if (threadIdx.x % 32 == 0) red[threadIdx.y][threadIdx.x / 32] = v;
  __syncthreads();
  float2 t = make_float2(0.0f, 0.0f);
  for (int w = 0; w < warps; ++w) t.x += red[threadIdx.y][w].x, t.y += red[threadIdx.y][w].y;
  __syncthreads();  // red is rewritten by the next call
  return t;
}

// This thread's 8 elements [e0, e0 + 8) of a row, zero past dim.
template <bool kVecIO, typename T>
__device__ __forceinline__ void load_part(const T* row, int64_t e0, int64_t dim, float (&v)[kVec]) {
  if constexpr (kVecIO) {  // dim a multiple of 8: a vector is all in the row or all past it
    if (e0 < dim) load8(row + e0, v);
    else
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = 0.0f;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = e0 + j < dim ? to_f(row[e0 + j]) : 0.0f;
  }
}

template <bool kVecIO, typename T>
__device__ __forceinline__ void store_part(T* row, int64_t e0, int64_t dim, const float (&v)[kVec]) {
  if constexpr (kVecIO) {
    if (e0 < dim) store8(row + e0, v);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (e0 + j < dim) row[e0 + j] = from_f<T>(v[j]);
  }
}

// x = word[id] + pos[position], this thread's part.
template <bool kVecIO, typename T>
__device__ __forceinline__ void row_part(const TokenEmbedArgs& a, TokenRow row, int64_t e0, float (&x)[kVec]) {
  float p[kVec];
  load_part<kVecIO>(static_cast<const T*>(a.word) + row.id * a.dim, e0, a.dim, x);
  load_part<kVecIO>(static_cast<const T*>(a.pos) + row.position * a.dim, e0, a.dim, p);
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] += p[j];
}

template <typename T, bool kVecIO>
__global__ void forward_kernel(TokenEmbedArgs a) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y, e0 = int64_t(threadIdx.x) * kVec;
  const bool valid = r < token_rows(a);  // an idle group still joins the block's barriers
  const TokenRow found = valid ? token_row(a, r) : TokenRow{0, 0};
  const bool bad = found.id < 0;  // an id out of range: a NaN row
  const TokenRow row = bad ? TokenRow{0, 0} : found;
  float x[kVec], w[kVec], b[kVec];
  row_part<kVecIO, T>(a, row, e0, x);
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) s += x[j];
  const float inv_dim = 1.0f / float(a.dim);
  const float mean = row_sum(make_float2(s, 0.0f)).x * inv_dim;
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float d = e0 + j < a.dim ? x[j] - mean : 0.0f;
    ss += d * d;
  }
  const float var = row_sum(make_float2(ss, 0.0f)).x * inv_dim;  // every group joins the reduction
  const float rstd = bad ? __int_as_float(0x7fffffff) : rsqrtf(var + a.eps);
  if (!valid) return;
  load_part<kVecIO>(static_cast<const T*>(a.ln_weight), e0, a.dim, w);
  load_part<kVecIO>(static_cast<const T*>(a.ln_bias), e0, a.dim, b);
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] = (x[j] - mean) * rstd * w[j] + b[j];
  store_part<kVecIO>(static_cast<T*>(a.out) + r * a.dim, e0, a.dim, x);
  if (threadIdx.x == 0) {
    a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
}

template <typename T, bool kVecIO>
__global__ void backward_kernel(TokenEmbedArgs a, float* dx, int64_t* word_key, int64_t* pos_key, float* partial) {
  extern __shared__ float sums[];  // (2, dim): the groups' parameter sums, added in group order
  const int64_t rows = token_rows(a), e0 = int64_t(threadIdx.x) * kVec;
  const int64_t first = (int64_t(blockIdx.x) * blockDim.y + threadIdx.y) * kRowsPerGroup;
  const float inv_dim = 1.0f / float(a.dim);
  float w[kVec], pw[kVec] = {}, pb[kVec] = {};
  load_part<kVecIO>(static_cast<const T*>(a.ln_weight), e0, a.dim, w);
  for (int i = 0; i < kRowsPerGroup; ++i) {
    const int64_t r = first + i;
    const TokenRow found = r < rows ? token_row(a, r) : TokenRow{-1, -1};
    const bool valid = found.id >= 0;  // a row out of range (forward made it NaN) adds nothing
    const TokenRow row = valid ? found : TokenRow{0, 0};
    float x[kVec], dy[kVec], g[kVec];
    row_part<kVecIO, T>(a, row, e0, x);
    if (valid) {
      load_part<kVecIO>(static_cast<const T*>(a.dy) + r * a.dim, e0, a.dim, dy);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) dy[j] = 0.0f;
    }
    const float mean = valid ? a.mean[r] : 0.0f, rstd = valid ? a.rstd[r] : 0.0f;
    float2 s = make_float2(0.0f, 0.0f);  // sums of g = dy ln_weight and of g x_hat
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      x[j] = (x[j] - mean) * rstd;  // x_hat
      g[j] = dy[j] * w[j];
      s.x += g[j];
      s.y += g[j] * x[j];
      pw[j] += dy[j] * x[j];
      pb[j] += dy[j];
    }
    s = row_sum(s);
    if (r >= rows) continue;
    if (threadIdx.x == 0) {  // a row out of range sorts past every weight row: it adds nothing
      word_key[r] = valid ? row.id : a.vocab;
      pos_key[r] = valid ? row.position : a.length + 1;
    }
    if (!valid) continue;
#pragma unroll
    for (int j = 0; j < kVec; ++j) g[j] = (g[j] - s.x * inv_dim - x[j] * s.y * inv_dim) * rstd;  // dx
    store_part<kVecIO>(dx + r * a.dim, e0, a.dim, g);
  }
  for (int group = 0; group < int(blockDim.y); ++group) {
    if (threadIdx.y == group)
      for (int j = 0; j < kVec; ++j)
        if (e0 + j < a.dim) {
          sums[e0 + j] = (group ? sums[e0 + j] : 0.0f) + pw[j];
          sums[a.dim + e0 + j] = (group ? sums[a.dim + e0 + j] : 0.0f) + pb[j];
        }
    __syncthreads();
  }
  float* out = partial + int64_t(blockIdx.x) * 2 * a.dim;
  for (int64_t e = threadIdx.y * blockDim.x + threadIdx.x; e < 2 * a.dim; e += blockDim.x * blockDim.y)
    out[e] = sums[e];
}

// Segment sums: grad[v] = the sum of dx's rows perm[offsets[v], offsets[v + 1]), zero when
// empty. A block is one (v, column tile of kSegCols): 32 lanes of 4 columns (16-byte loads where
// dim is a multiple of 4), kSegWarps warps. Warp w sums the sources w, w + kSegWarps, ... of the
// segment in order (kSegUnroll of them in flight); the warps' sums are added in warp order.
constexpr int kSegWarps = 8, kSegCols = 32 * 4, kSegUnroll = 8;

template <bool kVec4>
__device__ __forceinline__ void load4(const float* row, int64_t c0, int64_t dim, float (&v)[4]) {
  if constexpr (kVec4) {  // dim a multiple of 4: a vector is all in the row or all past it
    const float4 f = c0 < dim ? __ldg(reinterpret_cast<const float4*>(row + c0)) : make_float4(0.f, 0.f, 0.f, 0.f);
    v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = c0 + j < dim ? __ldg(row + c0 + j) : 0.0f;
  }
}

template <typename T, bool kVec4>  // no __launch_bounds__: with it ptxas 13.0 spills 8 bytes
__global__ void segment_sum_kernel(const float* __restrict__ dx, int64_t dim, const int64_t* __restrict__ perm,
                                   const int64_t* __restrict__ offsets, T* __restrict__ grad) {
  __shared__ __align__(16) float sums[kSegWarps][kSegCols];
  const int64_t v = blockIdx.x, tile = int64_t(blockIdx.y) * kSegCols, c0 = tile + threadIdx.x * 4;
  const int64_t lo = offsets[v], hi = offsets[v + 1];
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (c0 < dim) {  // this warp's sources lo + w, lo + w + kSegWarps, ... in order
    int64_t s = lo + threadIdx.y;
    for (; s + int64_t(kSegUnroll - 1) * kSegWarps < hi; s += int64_t(kSegUnroll) * kSegWarps) {
      int64_t src[kSegUnroll];  // whole rounds: kSegUnroll independent loads, then the adds in order
      float x[kSegUnroll][4];
#pragma unroll
      for (int u = 0; u < kSegUnroll; ++u) src[u] = perm[s + int64_t(u) * kSegWarps];
#pragma unroll
      for (int u = 0; u < kSegUnroll; ++u) load4<kVec4>(dx + src[u] * dim, c0, dim, x[u]);
#pragma unroll
      for (int u = 0; u < kSegUnroll; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] += x[u][j];
    }
    for (; s < hi; s += kSegWarps) {
      float x[4];
      load4<kVec4>(dx + perm[s] * dim, c0, dim, x);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += x[j];
    }
  }
  *reinterpret_cast<float4*>(&sums[threadIdx.y][threadIdx.x * 4]) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  const int t = threadIdx.y * 32 + threadIdx.x;  // one column a thread, the warps' sums in warp order
  if (t < kSegCols && tile + t < dim) {
    float total = sums[0][t];
#pragma unroll
    for (int w = 1; w < kSegWarps; ++w) total += sums[w][t];
    grad[v * dim + tile + t] = from_f<T>(total);
  }
}

struct Shape {
  dim3 block;
  int64_t rows_per_block;
};

// A row's threads: 8 elements each, a multiple of a warp; as many rows a block as make about 512 threads.
Shape shape(const TokenEmbedArgs& a, int rows_per_group) {
  const int threads = int((a.dim + kVec * 32 - 1) / (kVec * 32)) * 32;
  const int groups = std::max(1, std::min(kMaxGroups, 512 / threads));
  return Shape{dim3(threads, groups), int64_t(groups) * rows_per_group};
}

// 16-byte accesses: rows a multiple of 8 elements and every base 16-byte aligned.
bool vector_io(const TokenEmbedArgs& a, const void* extra) {
  auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return a.dim % kVec == 0 && aligned(a.word) && aligned(a.pos) && aligned(a.ln_weight) && aligned(a.ln_bias) &&
         aligned(a.out) && aligned(a.dy) && aligned(extra);
}

template <typename Fn>
void dispatch_io(DType dtype, bool vec_io, Fn&& fn) {
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (vec_io) fn(static_cast<T*>(nullptr), std::true_type{});
    else fn(static_cast<T*>(nullptr), std::false_type{});
  });
}

}  // namespace

cudaError_t launch_token_embed_forward(const TokenEmbedArgs& a, cudaStream_t stream) {
  if (a.dim > kTokenEmbedMaxDim) return cudaErrorInvalidValue;
  const Shape s = shape(a, 1);
  const int64_t blocks = (token_rows(a) + s.rows_per_block - 1) / s.rows_per_block;
  dispatch_io(a.dtype, vector_io(a, nullptr), [&](auto* tag, auto vec_io) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward_kernel<T, decltype(vec_io)::value><<<unsigned(blocks), s.block, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

int64_t token_embed_backward_blocks(const TokenEmbedArgs& a) {
  const Shape s = shape(a, kRowsPerGroup);
  return (token_rows(a) + s.rows_per_block - 1) / s.rows_per_block;
}

cudaError_t launch_token_embed_backward(const TokenEmbedArgs& a, float* dx, int64_t* word_key, int64_t* pos_key,
                                        float* partial, cudaStream_t stream) {
  if (a.dim > kTokenEmbedMaxDim) return cudaErrorInvalidValue;
  const Shape s = shape(a, kRowsPerGroup);
  const size_t shared = size_t(2 * a.dim) * sizeof(float);
  dispatch_io(a.dtype, vector_io(a, dx), [&](auto* tag, auto vec_io) {
    using T = std::remove_pointer_t<decltype(tag)>;
    backward_kernel<T, decltype(vec_io)::value>
        <<<unsigned(token_embed_backward_blocks(a)), s.block, shared, stream>>>(a, dx, word_key, pos_key, partial);
  });
  return cudaGetLastError();
}

cudaError_t launch_token_embed_segment_sum(const float* dx, int64_t dim, const int64_t* perm, const int64_t* offsets,
                                           int64_t destinations, void* grad, DType dtype, cudaStream_t stream) {
  const int64_t tiles = (dim + kSegCols - 1) / kSegCols;
  if (destinations > 0x7fffffff || tiles > 65535) return cudaErrorInvalidValue;
  if (destinations == 0) return cudaSuccess;
  const bool vec4 = dim % 4 == 0 && reinterpret_cast<uintptr_t>(dx) % 16 == 0;
  const dim3 grid{unsigned(destinations), unsigned(tiles)}, block{32, kSegWarps};
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (vec4) segment_sum_kernel<T, true><<<grid, block, 0, stream>>>(dx, dim, perm, offsets, static_cast<T*>(grad));
    else segment_sum_kernel<T, false><<<grid, block, 0, stream>>>(dx, dim, perm, offsets, static_cast<T*>(grad));
  });
  return cudaGetLastError();
}

}  // namespace fastforget
