// The forget/retain embedding-distance loss on the CPU: kernels on raw pointers and sizes.
#pragma once
#include <cstdint>

#include "scalar.h"
#include "../common/unlearn_loss_math.h"

namespace fastforget {

// Rows are `cols` contiguous elements apart by their row stride (in elements).
struct UnlearnLossArgs {
  const void* student; int64_t student_stride; DType student_dtype;
  const void* retain; int64_t retain_stride;
  const void* forget; int64_t forget_stride; DType target_dtype;  // both targets share a dtype
  const uint8_t* is_forget;  // (rows,), nonzero = forget row
  int64_t rows, cols;
  void* grad;  // (rows, cols) contiguous in the student's dtype, or null: no gradient wanted
  float grad_coef_retain, grad_coef_forget;  // grad = coef * (student - target) on each set's rows
};

// Columns are cut into chunks of this many elements: a task is one (row, chunk) pair, so one long
// row still spreads over every thread, and the per-chunk partial sums make the result independent
// of the thread count (bitwise deterministic).
constexpr int64_t kChunk = 16384;
inline int64_t num_chunks(int64_t cols) { return cols == 0 ? 1 : (cols + kChunk - 1) / kChunk; }

// For tasks [task_begin, task_end): partial[task] = sum of (student - target)^2 over the chunk,
// and the gradient of the chunk when args.grad is set.
void unlearn_loss_chunks(const UnlearnLossArgs& args, int64_t task_begin, int64_t task_end, float* partial);

// grad[row] *= scale of the row's set, for tasks [task_begin, task_end); a set whose scale is
// exactly 1 is skipped without touching memory.
void scale_rows_chunks(void* grad, DType dtype, const uint8_t* is_forget, int64_t cols, float scale_retain,
                       float scale_forget, int64_t task_begin, int64_t task_end);

}  // namespace fastforget
