// Fused forget/retain loss over a table of tensors: one launch reads each student and its row's
// target, writes the gradient and a per-chunk partial sum, for every (tensor, row, chunk) of the
// table; a one-block pass reduces the partials in a fixed order (deterministic, no atomics). The
// table travels by value in the kernels' arguments (as apex's multi-tensor kernels do): no host
// copy, no synchronisation. Loads are 16 bytes wide when every row start is 16-byte aligned.
#include "unlearn_loss.h"
#include "scalar.cuh"
#include "vector.cuh"

namespace fastforget {
namespace {

constexpr int kThreads = 256;
constexpr int kSteps = 4;  // steps per chunk: enough bytes in flight per block to cover latency
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kSteps;
// Above this many rows each block would re-read too much of is_forget: count once, up front.
constexpr int64_t kInlineCountMaxRows = 4096;
constexpr int kFinalizeThreads = 1024;

// The tables the kernels take by value: per tensor what differs; what the tensors share, once.
struct LossTensor {
  const void* student; const void* retain; const void* forget; void* grad;
  int64_t student_stride, retain_stride, forget_stride, cols;
};
struct LossTable {
  LossTensor t[kMaxLossTensors];
  int64_t first_block[kMaxLossTensors + 1];  // tensor i's blocks: [first_block[i], first_block[i + 1])
  const uint8_t* is_forget;
  int64_t rows;
  float retain_weight, forget_weight;
  int32_t normalize;
  int count;
};
struct ScaleTable {
  void* grad[kMaxLossTensors];
  int64_t cols[kMaxLossTensors];
  int64_t first_block[kMaxLossTensors + 1];
  int count;
};
static_assert(sizeof(LossTable) < 4096, "kernel arguments stay under the 4 KiB every CUDA version takes");

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

// Which tensor of a table block b belongs to: tensor i owns [first_block[i], first_block[i + 1]).
__device__ __forceinline__ int table_entry(const int64_t* first_block, int count, int64_t b) {
  int i = 0;
  while (i + 1 < count && b >= first_block[i + 1]) ++i;
  return i;
}

// One block per (tensor, row, chunk) of kChunk columns; partial[block] = sum of squared differences.
template <typename S, typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(LossTable table, const int* pre_count, float* partial) {
  const int i = table_entry(table.first_block, table.count, blockIdx.x);
  const LossTensor& a = table.t[i];
  const int64_t local = blockIdx.x - table.first_block[i];
  const int64_t chunks = (a.cols + kChunk - 1) / kChunk;
  const int64_t row = local / chunks;
  const int64_t begin = (local % chunks) * kChunk;
  const int64_t end = min(begin + kChunk, a.cols);

  const bool forget = table.is_forget[row] != 0;
  const S* s = static_cast<const S*>(a.student) + row * a.student_stride;
  const T* t = forget ? static_cast<const T*>(a.forget) + row * a.forget_stride
                      : static_cast<const T*>(a.retain) + row * a.retain_stride;
  S* g = a.grad ? static_cast<S*>(a.grad) + row * a.cols : nullptr;
  float coef = 0.0f;
  if (g) {
    const int n_forget = pre_count ? *pre_count : count_forget_rows(table.is_forget, table.rows);
    coef = grad_coef(table.normalize, forget ? n_forget : table.rows - n_forget, table.rows, a.cols,
                     forget ? table.forget_weight : table.retain_weight);
  }

  float acc = 0.0f;
  int64_t k0 = begin;
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
    k0 = vec_end;
  }
  for (int64_t k = k0 + threadIdx.x; k < end; k += kThreads) {
    const float d = to_f(s[k]) - to_f(t[k]);
    acc += d * d;
    if (g) g[k] = from_f<S>(coef * d);
  }
  acc = block_sum<float, kThreads>(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: per tensor, per-row sums of its partials, then each set's sum, in a fixed order;
// the outputs add the tensors' losses in table order.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const float* partial, LossTable table, float* loss, float* retain_loss, float* forget_loss) {
  int n_forget = 0;
  for (int64_t row = threadIdx.x; row < table.rows; row += kFinalizeThreads) n_forget += table.is_forget[row] != 0;
  n_forget = block_sum<int, kFinalizeThreads>(n_forget);
  __shared__ int n_forget_all;
  if (threadIdx.x == 0) n_forget_all = n_forget;
  __syncthreads();
  const float norm_retain = set_norm(table.normalize, table.rows - n_forget_all, table.rows);
  const float norm_forget = set_norm(table.normalize, n_forget_all, table.rows);
  float total_retain = 0.0f, total_forget = 0.0f;  // valid in thread 0
  for (int i = 0; i < table.count; ++i) {
    const LossTensor& a = table.t[i];
    const float* p = partial + table.first_block[i];
    const int64_t chunks = (a.cols + kChunk - 1) / kChunk;
    float sum_retain = 0.0f, sum_forget = 0.0f;
    for (int64_t row = threadIdx.x; row < table.rows; row += kFinalizeThreads) {
      float r = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) r += p[row * chunks + c];
      if (table.is_forget[row]) sum_forget += r; else sum_retain += r;
    }
    sum_retain = block_sum<float, kFinalizeThreads>(sum_retain);
    sum_forget = block_sum<float, kFinalizeThreads>(sum_forget);
    total_retain += sum_retain / float(a.cols) * norm_retain;
    total_forget += sum_forget / float(a.cols) * norm_forget;
  }
  if (threadIdx.x == 0) {
    *retain_loss = total_retain;
    *forget_loss = total_forget;
    *loss = table.retain_weight * total_retain + table.forget_weight * total_forget;
  }
}

template <typename S, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(ScaleTable table, const uint8_t* is_forget, const float* grad_loss, const float* grad_retain,
                 const float* grad_forget, float retain_weight, float forget_weight) {
  const int i = table_entry(table.first_block, table.count, blockIdx.x);
  const int64_t cols = table.cols[i], local = blockIdx.x - table.first_block[i];
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  const int64_t row = local / chunks;
  const int64_t begin = (local % chunks) * kChunk;
  const int64_t end = min(begin + kChunk, cols);
  const bool forget = is_forget[row] != 0;
  const float* gs = forget ? grad_forget : grad_retain;
  const float scale = backward_scale(grad_loss ? *grad_loss : 0.0f, gs ? *gs : 0.0f,
                                     forget ? forget_weight : retain_weight);
  if (scale == 1.0f) return;  // the common case, loss.backward(): no memory traffic at all
  S* g = static_cast<S*>(table.grad[i]) + row * cols;
  int64_t k0 = begin;
  if constexpr (kAligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t k = begin + int64_t(threadIdx.x) * kVec; k < vec_end; k += int64_t(kThreads) * kVec) {
      float v[kVec];
      load8</*kReadOnly=*/false>(g + k, v);  // rescaled in place: not a read-only buffer
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] *= scale;
      store8(g + k, v);
    }
    k0 = vec_end;
  }
  for (int64_t k = k0 + threadIdx.x; k < end; k += kThreads) g[k] = from_f<S>(to_f(g[k]) * scale);
}

bool aligned16(const void* p, int64_t row_stride_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride_bytes % 16 == 0;
}

int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

}  // namespace

int64_t unlearn_loss_scratch_floats(const UnlearnLossArgs* tensors, int count) {
  int64_t blocks = 0;
  for (int i = 0; i < count; ++i) blocks += tensors[i].rows * ((tensors[i].cols + kChunk - 1) / kChunk);
  return blocks;
}

cudaError_t launch_unlearn_loss_forward(const UnlearnLossArgs* tensors, int count, float* scratch, int* count_scratch,
                                        float* loss, float* retain_loss, float* forget_loss, cudaStream_t stream) {
  if (count < 1 || count > kMaxLossTensors) return cudaErrorInvalidValue;
  const UnlearnLossArgs& first = tensors[0];
  LossTable table{};
  table.count = count;
  table.is_forget = first.is_forget;
  table.rows = first.rows;
  table.retain_weight = first.retain_weight;
  table.forget_weight = first.forget_weight;
  table.normalize = first.normalize;
  const int64_t ss = dtype_size(first.student_dtype), ts = dtype_size(first.target_dtype);
  bool aligned = true, grad = first.grad != nullptr;
  for (int i = 0; i < count; ++i) {
    const UnlearnLossArgs& a = tensors[i];
    if (a.student_dtype != first.student_dtype || a.target_dtype != first.target_dtype) return cudaErrorInvalidValue;
    table.t[i] = LossTensor{a.student, a.retain, a.forget, a.grad, a.student_stride, a.retain_stride,
                            a.forget_stride, a.cols};
    table.first_block[i + 1] = table.first_block[i] + a.rows * ((a.cols + kChunk - 1) / kChunk);
    aligned = aligned && aligned16(a.student, a.student_stride * ss) && aligned16(a.retain, a.retain_stride * ts) &&
              aligned16(a.forget, a.forget_stride * ts) && (a.grad == nullptr || aligned16(a.grad, a.cols * ss));
  }
  const int64_t blocks = table.first_block[count];
  const int* pre_count = nullptr;
  if (grad && first.rows > kInlineCountMaxRows) {
    count_kernel<<<1, kThreads, 0, stream>>>(first.is_forget, first.rows, count_scratch);
    pre_count = count_scratch;
  }
  dispatch(first.student_dtype, [&](auto* s_tag) {
    dispatch(first.target_dtype, [&](auto* t_tag) {
      using S = std::remove_pointer_t<decltype(s_tag)>;
      using T = std::remove_pointer_t<decltype(t_tag)>;
      if (aligned)
        forward_kernel<S, T, true><<<blocks, kThreads, 0, stream>>>(table, pre_count, scratch);
      else
        forward_kernel<S, T, false><<<blocks, kThreads, 0, stream>>>(table, pre_count, scratch);
    });
  });
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(scratch, table, loss, retain_loss, forget_loss);
  return cudaGetLastError();
}

cudaError_t launch_unlearn_loss_scale_grad(void* const* grads, const int64_t* cols, int count, DType dtype,
                                           const uint8_t* is_forget, int64_t rows, const float* grad_loss,
                                           const float* grad_retain, const float* grad_forget, float retain_weight,
                                           float forget_weight, cudaStream_t stream) {
  if (count < 1 || count > kMaxLossTensors) return cudaErrorInvalidValue;
  ScaleTable table{};
  table.count = count;
  bool aligned = true;
  for (int i = 0; i < count; ++i) {
    table.grad[i] = grads[i];
    table.cols[i] = cols[i];
    table.first_block[i + 1] = table.first_block[i] + rows * ((cols[i] + kChunk - 1) / kChunk);
    aligned = aligned && aligned16(grads[i], cols[i] * dtype_size(dtype));
  }
  const int64_t blocks = table.first_block[count];
  dispatch(dtype, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    if (aligned)
      scale_kernel<S, true><<<blocks, kThreads, 0, stream>>>(table, is_forget, grad_loss, grad_retain, grad_forget,
                                                             retain_weight, forget_weight);
    else
      scale_kernel<S, false><<<blocks, kThreads, 0, stream>>>(table, is_forget, grad_loss, grad_retain, grad_forget,
                                                              retain_weight, forget_weight);
  });
  return cudaGetLastError();
}

}  // namespace fastforget
