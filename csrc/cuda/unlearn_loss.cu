// Fused forget/retain loss: one pass reads student and the row's target, writes the gradient and a
// per-chunk partial sum; a one-block pass reduces the partials in a fixed order (deterministic, no
// atomics). Loads are 16 bytes wide when every row start is 16-byte aligned.
#include "unlearn_loss.h"
#include "scalar.cuh"

namespace fastforget {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;    // elements a thread moves per step: 16 bytes of a 16-bit dtype
constexpr int kSteps = 4;  // steps per chunk: enough bytes in flight per block to cover latency
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kSteps;
// Above this many rows each block would re-read too much of is_forget: count once, up front.
constexpr int64_t kInlineCountMaxRows = 4096;
constexpr int kFinalizeThreads = 1024;

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

__device__ int count_forget_rows(const uint8_t* is_forget, int64_t rows) {
  int c = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) c += is_forget[i] != 0;
  __shared__ int total;
  c = block_sum<int, kThreads>(c);
  if (threadIdx.x == 0) total = c;
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kThreads) count_kernel(const uint8_t* is_forget, int64_t rows, int* count) {
  const int c = count_forget_rows(is_forget, rows);
  if (threadIdx.x == 0) *count = c;
}

// One block per (row, chunk) of kChunk columns; partial[block] = sum of squared differences.
template <typename S, typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(UnlearnLossArgs a, const int* pre_count, float* partial) {
  const int64_t chunks = (a.cols + kChunk - 1) / kChunk;
  const int64_t row = blockIdx.x / chunks;
  const int64_t begin = (blockIdx.x % chunks) * kChunk;
  const int64_t end = min(begin + kChunk, a.cols);

  const bool forget = a.is_forget[row] != 0;
  const S* s = static_cast<const S*>(a.student) + row * a.student_stride;
  const T* t = forget ? static_cast<const T*>(a.forget) + row * a.forget_stride
                      : static_cast<const T*>(a.retain) + row * a.retain_stride;
  S* g = a.grad ? static_cast<S*>(a.grad) + row * a.cols : nullptr;
  float coef = 0.0f;
  if (g) {
    const int n_forget = pre_count ? *pre_count : count_forget_rows(a.is_forget, a.rows);
    coef = grad_coef(a.normalize_set, forget ? n_forget : a.rows - n_forget, a.rows, a.cols,
                     forget ? a.forget_weight : a.retain_weight);
  }

  float acc = 0.0f;
  int64_t i = begin;
  if constexpr (kAligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t k = begin + int64_t(threadIdx.x) * kVec; k < vec_end; k += int64_t(kThreads) * kVec) {
      float sv[kVec], tv[kVec];
      load8(s + k, sv);
      load8(t + k, tv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sv[j] -= tv[j];
        acc += sv[j] * sv[j];
        sv[j] *= coef;
      }
      if (g) store8(g + k, sv);
    }
    i = vec_end;
  }
  for (int64_t k = i + threadIdx.x; k < end; k += kThreads) {
    const float d = to_f(s[k]) - to_f(t[k]);
    acc += d * d;
    if (g) g[k] = from_f<S>(coef * d);
  }
  acc = block_sum<float, kThreads>(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: per-row sums of the partials, then each set's sum, in a fixed order.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const float* partial, UnlearnLossArgs a, float* loss, float* retain_loss, float* forget_loss) {
  const int64_t chunks = (a.cols + kChunk - 1) / kChunk;
  float sum_retain = 0.0f, sum_forget = 0.0f;
  int n_forget = 0;
  for (int64_t row = threadIdx.x; row < a.rows; row += kFinalizeThreads) {
    float r = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) r += partial[row * chunks + c];
    if (a.is_forget[row]) { sum_forget += r; ++n_forget; } else { sum_retain += r; }
  }
  sum_retain = block_sum<float, kFinalizeThreads>(sum_retain);
  sum_forget = block_sum<float, kFinalizeThreads>(sum_forget);
  n_forget = block_sum<int, kFinalizeThreads>(n_forget);
  if (threadIdx.x == 0) {
    const float r = sum_retain / float(a.cols) * set_norm(a.normalize_set, a.rows - n_forget, a.rows);
    const float f = sum_forget / float(a.cols) * set_norm(a.normalize_set, n_forget, a.rows);
    *retain_loss = r;
    *forget_loss = f;
    *loss = a.retain_weight * r + a.forget_weight * f;
  }
}

template <typename S, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(S* grad, const uint8_t* is_forget, int64_t cols, const float* grad_loss, const float* grad_retain,
                 const float* grad_forget, float retain_weight, float forget_weight) {
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  const int64_t row = blockIdx.x / chunks;
  const int64_t begin = (blockIdx.x % chunks) * kChunk;
  const int64_t end = min(begin + kChunk, cols);
  const bool forget = is_forget[row] != 0;
  const float* gs = forget ? grad_forget : grad_retain;
  const float scale = backward_scale(grad_loss ? *grad_loss : 0.0f, gs ? *gs : 0.0f,
                                     forget ? forget_weight : retain_weight);
  if (scale == 1.0f) return;  // the common case, loss.backward(): no memory traffic at all
  S* g = grad + row * cols;
  int64_t i = begin;
  if constexpr (kAligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t k = begin + int64_t(threadIdx.x) * kVec; k < vec_end; k += int64_t(kThreads) * kVec) {
      float v[kVec];
      load8</*kReadOnly=*/false>(g + k, v);  // rescaled in place: not a read-only buffer
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] *= scale;
      store8(g + k, v);
    }
    i = vec_end;
  }
  for (int64_t k = i + threadIdx.x; k < end; k += kThreads) g[k] = from_f<S>(to_f(g[k]) * scale);
}

bool aligned16(const void* p, int64_t row_stride_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride_bytes % 16 == 0;
}

int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

}  // namespace

int64_t unlearn_loss_scratch_floats(int64_t rows, int64_t cols) { return rows * ((cols + kChunk - 1) / kChunk); }

cudaError_t launch_unlearn_loss_forward(const UnlearnLossArgs& a, float* scratch, int* count_scratch, float* loss,
                                 float* retain_loss, float* forget_loss, cudaStream_t stream) {
  const int64_t blocks = unlearn_loss_scratch_floats(a.rows, a.cols);
  const int64_t ss = dtype_size(a.student_dtype), ts = dtype_size(a.target_dtype);
  const bool aligned = aligned16(a.student, a.student_stride * ss) && aligned16(a.retain, a.retain_stride * ts) &&
                       aligned16(a.forget, a.forget_stride * ts) &&
                       (a.grad == nullptr || aligned16(a.grad, a.cols * ss));
  const int* pre_count = nullptr;
  if (a.grad && a.rows > kInlineCountMaxRows) {
    count_kernel<<<1, kThreads, 0, stream>>>(a.is_forget, a.rows, count_scratch);
    pre_count = count_scratch;
  }
  dispatch(a.student_dtype, [&](auto* s_tag) {
    dispatch(a.target_dtype, [&](auto* t_tag) {
      using S = std::remove_pointer_t<decltype(s_tag)>;
      using T = std::remove_pointer_t<decltype(t_tag)>;
      if (aligned)
        forward_kernel<S, T, true><<<blocks, kThreads, 0, stream>>>(a, pre_count, scratch);
      else
        forward_kernel<S, T, false><<<blocks, kThreads, 0, stream>>>(a, pre_count, scratch);
    });
  });
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(scratch, a, loss, retain_loss, forget_loss);
  return cudaGetLastError();
}

cudaError_t launch_unlearn_loss_scale_grad(void* grad, DType dtype, const uint8_t* is_forget, int64_t rows, int64_t cols,
                                    const float* grad_loss, const float* grad_retain, const float* grad_forget,
                                    float retain_weight, float forget_weight, cudaStream_t stream) {
  const int64_t blocks = unlearn_loss_scratch_floats(rows, cols);
  const bool aligned = aligned16(grad, cols * dtype_size(dtype));
  dispatch(dtype, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    S* g = static_cast<S*>(grad);
    if (aligned)
      scale_kernel<S, true><<<blocks, kThreads, 0, stream>>>(g, is_forget, cols, grad_loss, grad_retain, grad_forget,
                                                             retain_weight, forget_weight);
    else
      scale_kernel<S, false><<<blocks, kThreads, 0, stream>>>(g, is_forget, cols, grad_loss, grad_retain,
                                                              grad_forget, retain_weight, forget_weight);
  });
  return cudaGetLastError();
}

}  // namespace fastforget
