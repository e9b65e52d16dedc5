#include "unlearn_loss.h"

#include <type_traits>

namespace fastforget {
namespace {

// 16 independent float accumulators: the compiler keeps them in vector registers and the
// summation order stays fixed (no -ffast-math reassociation needed, results are reproducible).
constexpr int kLanes = 16;

template <typename S, typename T, bool kWriteGrad>
float chunk_sum_sq(const S* s, const T* t, S* g, int64_t n, float coef) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float d = to_float(s[i + j]) - to_float(t[i + j]);
      acc[j] += d * d;
      if (kWriteGrad) g[i + j] = from_float<S>(coef * d);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float d = to_float(s[i]) - to_float(t[i]);
    acc[j] += d * d;
    if (kWriteGrad) g[i] = from_float<S>(coef * d);
  }
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

template <typename S, typename T>
void run_chunks(const UnlearnLossArgs& a, int64_t n_forget, int64_t task_begin, int64_t task_end, float* partial) {
  const int64_t chunks = num_chunks(a.cols);
  const float coef_retain = grad_coef(a.normalize, a.rows - n_forget, a.rows, a.cols, a.retain_weight);
  const float coef_forget = grad_coef(a.normalize, n_forget, a.rows, a.cols, a.forget_weight);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t row = task / chunks, begin = (task % chunks) * kChunk;
    const int64_t n = begin < a.cols ? (a.cols - begin < kChunk ? a.cols - begin : kChunk) : 0;
    const bool forget = a.is_forget[row] != 0;
    const S* s = static_cast<const S*>(a.student) + row * a.student_stride + begin;
    const T* t = forget ? static_cast<const T*>(a.forget) + row * a.forget_stride + begin
                        : static_cast<const T*>(a.retain) + row * a.retain_stride + begin;
    if (a.grad != nullptr) {
      S* g = static_cast<S*>(a.grad) + row * a.cols + begin;
      partial[task] = chunk_sum_sq<S, T, true>(s, t, g, n, forget ? coef_forget : coef_retain);
    } else {
      partial[task] = chunk_sum_sq<S, T, false>(s, t, nullptr, n, 0.0f);
    }
  }
}

template <typename S>
void scale_chunk(S* g, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) g[i] = from_float<S>(to_float(g[i]) * scale);
}

}  // namespace

void unlearn_loss_chunks(const UnlearnLossArgs& args, int64_t n_forget, int64_t task_begin, int64_t task_end,
                         float* partial) {
  dispatch_dtype(args.student_dtype, [&](auto* s_tag) {
    dispatch_dtype(args.target_dtype, [&](auto* t_tag) {
      using S = std::remove_pointer_t<decltype(s_tag)>;
      using T = std::remove_pointer_t<decltype(t_tag)>;
      run_chunks<S, T>(args, n_forget, task_begin, task_end, partial);
    });
  });
}

void scale_rows_chunks(void* grad, DType dtype, const uint8_t* is_forget, int64_t cols, float scale_retain,
                       float scale_forget, int64_t task_begin, int64_t task_end) {
  const int64_t chunks = num_chunks(cols);
  dispatch_dtype(dtype, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t row = task / chunks, begin = (task % chunks) * kChunk;
      const float scale = is_forget[row] ? scale_forget : scale_retain;
      if (scale == 1.0f || begin >= cols) continue;
      const int64_t n = cols - begin < kChunk ? cols - begin : kChunk;
      scale_chunk(static_cast<S*>(grad) + row * cols + begin, n, scale);
    }
  });
}

}  // namespace fastforget
