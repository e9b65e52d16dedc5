// Each row's nearest code as a GEMM with its argmin in the epilogue. A block takes 64 rows and
// walks the codebook 64 codes at a time; 256 threads, each 4 rows x 4 codes of the tile, stage
// 16-deep slices of z and the codes in shared memory and multiply in float32 FMA (not TF32 or
// 16-bit tensor cores, which would round the operands and move the tokens). Each thread keeps
// its rows' running (min, argmin) over its codes, merged across the 16 threads of a row at the end.
#include <cstdint>
#include <type_traits>

#include "scalar.cuh"
#include "vq_quantize.h"

namespace fastforget {
namespace {

constexpr int kTile = 64;      // rows and codes of a block's tile
constexpr int kDepth = 16;     // dim per shared-memory slice
constexpr int kMicro = 4;      // rows and codes per thread
constexpr int kSide = kTile / kMicro;  // 16 threads along rows and along codes
constexpr int kThreads = kSide * kSide;

// ||e_j||^2, one warp per code, in float32.
template <typename C>
__global__ void norms_kernel(const C* codebook, int64_t codes, int64_t dim, float* norms) {
  const int64_t code = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (code >= codes) return;  // whole warps
  float sum = 0.0f;
  for (int64_t k = lane; k < dim; k += 32) {
    const float v = to_f(codebook[code * dim + k]);
    sum = fmaf(v, v, sum);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) norms[code] = sum;
}

// (distance, code) a before b: the smaller distance, the lower code among equals.
__device__ __forceinline__ bool before(float d, int32_t i, float best, int32_t arg) {
  return d < best || (d == best && i < arg);
}

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) argmin_kernel(VqQuantizeArgs a, const float* norms) {
  // [k][row] and [k][code]: a thread's 4 rows (codes) are one float4; 4 floats of padding make the
  // transposing stores 2-way bank conflicts, not 16-way, and keep the float4s aligned
  __shared__ __align__(16) float zs[kDepth][kTile + 4];
  __shared__ __align__(16) float es[kDepth][kTile + 4];
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;  // codes tx*4.., rows ty*4..
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const T* z = static_cast<const T*>(a.z);
  const C* e = static_cast<const C*>(a.codebook);
  float best[kMicro];
  int32_t arg[kMicro];
  for (int i = 0; i < kMicro; ++i) best[i] = INFINITY, arg[i] = 0;
  for (int64_t c0 = 0; c0 < a.codes; c0 += kTile) {
    float acc[kMicro][kMicro] = {};
    for (int64_t k0 = 0; k0 < a.dim; k0 += kDepth) {
      // 64 x 16 of each, 4 elements a thread; 16 neighbouring threads read 16 consecutive k of a row
      for (int j = threadIdx.x; j < kTile * kDepth; j += kThreads) {
        const int r = j / kDepth, k = j % kDepth;
        const int64_t kk = k0 + k, row = row0 + r, code = c0 + r;
        zs[k][r] = row < a.rows && kk < a.dim ? to_f(z[row * a.dim + kk]) : 0.0f;
        es[k][r] = code < a.codes && kk < a.dim ? to_f(e[code * a.dim + kk]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kDepth; ++k) {
        const float4 zr = *reinterpret_cast<const float4*>(&zs[k][ty * kMicro]);
        const float4 er = *reinterpret_cast<const float4*>(&es[k][tx * kMicro]);
        const float zv[kMicro] = {zr.x, zr.y, zr.z, zr.w}, ev[kMicro] = {er.x, er.y, er.z, er.w};
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(zv[i], ev[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Codes in increasing order, a strictly smaller distance replacing: the lowest code of a tie.
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t code = c0 + tx * kMicro + j;
      if (code >= a.codes) break;
      const float norm = norms[code];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const float d = norm - 2.0f * acc[i][j];
        if (d < best[i]) best[i] = d, arg[i] = int32_t(code);
      }
    }
  }
  // The 16 threads of a row are 16 neighbouring lanes of one warp.
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    for (int offset = kSide / 2; offset > 0; offset /= 2) {
      const float d = __shfl_xor_sync(0xffffffffu, best[i], offset);
      const int32_t c = __shfl_xor_sync(0xffffffffu, arg[i], offset);
      if (before(d, c, best[i], arg[i])) best[i] = d, arg[i] = c;
    }
    const int64_t row = row0 + ty * kMicro + i;
    if (tx == 0 && row < a.rows) a.indices[row] = arg[i];
  }
}

}  // namespace

cudaError_t launch_vq_quantize(const VqQuantizeArgs& a, float* norms, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const unsigned norm_blocks = unsigned((a.codes * 32 + 255) / 256);
  dispatch(a.codebook_dtype, [&](auto* code_tag) {
    using C = std::remove_pointer_t<decltype(code_tag)>;
    norms_kernel<C><<<norm_blocks, 256, 0, stream>>>(static_cast<const C*>(a.codebook), a.codes, a.dim, norms);
    dispatch(a.z_dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      argmin_kernel<T, C><<<unsigned((a.rows + kTile - 1) / kTile), kThreads, 0, stream>>>(a, norms);
    });
  });
  return cudaGetLastError();
}

}  // namespace fastforget
