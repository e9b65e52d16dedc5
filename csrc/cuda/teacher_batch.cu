// Teacher batch: per-chunk moments (two passes over a chunk the block just read, so the second
// hits L2), a one-block merge in a fixed tree order (deterministic), then one pass that copies
// retain rows and writes clamped Philox noise into forget rows.
#include "teacher_batch.h"
#include "scalar.cuh"

namespace fastforget {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kStatsChunk = 16384;
constexpr int kMergeThreads = 256;
constexpr int64_t kOutChunk = 4096;

__device__ double block_sum(double x) {
  __shared__ double warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
  __syncthreads();
  __shared__ double total;
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) t += warp_sums[w];
    total = t;
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moments_kernel(const T* x, int64_t numel, Moments* out) {
  const int64_t begin = int64_t(blockIdx.x) * kStatsChunk, end = min(begin + kStatsChunk, numel);
  float sum = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) sum += to_f(x[i]);
  const double n = double(end - begin);
  const double mean = block_sum(sum) / n;
  double m2 = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double d = double(to_f(x[i])) - mean;
    m2 += d * d;
  }
  m2 = block_sum(m2);
  if (threadIdx.x == 0) out[blockIdx.x] = Moments{n, mean, m2};
}

// One block: thread t merges chunks t, t + 256, ... in order, then a fixed pairwise tree.
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const Moments* parts, int64_t count, float* mean_std) {
  __shared__ Moments tree[kMergeThreads];
  Moments m{0.0, 0.0, 0.0};
  for (int64_t i = threadIdx.x; i < count; i += kMergeThreads) m = merge(m, parts[i]);
  tree[threadIdx.x] = m;
  __syncthreads();
  for (int width = kMergeThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) tree[threadIdx.x] = merge(tree[threadIdx.x], tree[threadIdx.x + width]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    mean_std[0] = float(tree[0].mean);
    mean_std[1] = float(sqrt(tree[0].m2 / (tree[0].count - 1.0)));  // unbiased, as torch.std
  }
}

// One block per (row, chunk of kOutChunk elements): the row's kind is one load per block.
template <typename T>
__global__ void __launch_bounds__(kThreads) output_kernel(TeacherBatchArgs a, const float* mean_std) {
  const int64_t chunks_per_row = (a.row_numel + kOutChunk - 1) / kOutChunk;
  const int64_t row = blockIdx.x / chunks_per_row;
  const int64_t begin = row * a.row_numel + (blockIdx.x % chunks_per_row) * kOutChunk;
  const int64_t end = min(begin + kOutChunk, (row + 1) * a.row_numel);
  const T* in = static_cast<const T*>(a.images);
  T* out = static_cast<T*>(a.out);
  if (!a.is_forget[row]) {  // retain rows: bit for bit
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) out[i] = in[i];
    return;
  }
  const uint64_t seed = uint64_t(a.stream[0]), first = uint64_t(a.stream[1]);
  const float mean = mean_std ? mean_std[0] : 0.0f, std = mean_std ? mean_std[1] : 0.0f;
  const float lo = a.clamp ? a.clamp_lo : 0.0f, hi = a.clamp ? a.clamp_hi : 1.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float v = noise_value(a.noise, first + uint64_t(i), seed, mean, std, lo, hi);
    if (a.clamp) v = v < a.clamp_lo ? a.clamp_lo : (v > a.clamp_hi ? a.clamp_hi : v);  // NaN stays NaN, as torch.clamp
    out[i] = from_f<T>(v);
  }
}

int64_t chunks(int64_t numel) { return (numel + kStatsChunk - 1) / kStatsChunk; }

}  // namespace

int64_t teacher_batch_scratch_bytes(int64_t numel) { return chunks(numel) * int64_t(sizeof(Moments)) + 16; }

cudaError_t launch_teacher_batch(const TeacherBatchArgs& a, void* scratch, cudaStream_t stream) {
  const int64_t numel = a.rows * a.row_numel;
  float* mean_std = nullptr;
  dispatch(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (a.noise != Noise::kUniform) {
      Moments* parts = static_cast<Moments*>(scratch);
      mean_std = reinterpret_cast<float*>(parts + chunks(numel));
      moments_kernel<T><<<chunks(numel), kThreads, 0, stream>>>(static_cast<const T*>(a.images), numel, parts);
      merge_kernel<<<1, kMergeThreads, 0, stream>>>(parts, chunks(numel), mean_std);
    }
    const int64_t blocks = a.rows * ((a.row_numel + kOutChunk - 1) / kOutChunk);
    output_kernel<T><<<blocks, kThreads, 0, stream>>>(a, mean_std);
  });
  return cudaGetLastError();
}

}  // namespace fastforget
