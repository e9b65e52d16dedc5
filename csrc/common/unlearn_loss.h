// The loss's arguments and scalar algebra, shared by the CPU and CUDA kernels (host and device).
//
// Row b's distance is d_b = sum_sq_b / cols. A set's loss is norm * sum of its rows' d_b, with
// norm = 1 / max(rows in the set, 1) ("set"), 2 / batch ("reference") or 1 / batch ("batch");
// loss = w_R L_R + w_F L_F. For a list of tensors (one table), each output is the tensors' sum.
// The forward pass writes g_b = c * norm * 2 (s_b - t_b) / cols, with c = w of the row's set (or 1
// when w = 0), which is d loss / d s_b exactly. Backward multiplies g_b by
// (grad_loss * w + grad_set) / c: exactly 1 for loss.backward(), so backward can skip it.
#pragma once
#include <cstdint>

#include "dtype.h"

#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif

namespace fastforget {

// The normalisations, as fastforget/ops/unlearn_loss.py's NORMALIZE indexes them.
enum Normalize : int32_t { kSet = 0, kReference = 1, kBatch = 2 };

// One tensor of a table: rows are `cols` contiguous elements, `*_stride` elements apart.
struct UnlearnLossArgs {
  const void* student; int64_t student_stride; DType student_dtype;
  const void* retain; int64_t retain_stride;
  const void* forget; int64_t forget_stride; DType target_dtype;  // both targets share a dtype
  const uint8_t* is_forget;  // (rows,), nonzero = forget row
  int64_t rows, cols;
  void* grad;  // (rows, cols) contiguous in the student's dtype, or null: no gradient wanted
  float retain_weight, forget_weight;
  int32_t normalize;  // a Normalize
};

FF_HOST_DEVICE float set_norm(int32_t normalize, int64_t rows_in_set, int64_t batch) {
  if (normalize == kSet) return 1.0f / float(rows_in_set > 0 ? rows_in_set : 1);
  return (normalize == kReference ? 2.0f : 1.0f) / float(batch);
}

FF_HOST_DEVICE float grad_weight(float w) { return w != 0.0f ? w : 1.0f; }

FF_HOST_DEVICE float grad_coef(int32_t normalize, int64_t rows_in_set, int64_t batch, int64_t cols, float w) {
  return grad_weight(w) * set_norm(normalize, rows_in_set, batch) * 2.0f / float(cols);
}

FF_HOST_DEVICE float backward_scale(float grad_loss, float grad_set, float w) {
  return (grad_loss * w + grad_set) / grad_weight(w);
}

}  // namespace fastforget
