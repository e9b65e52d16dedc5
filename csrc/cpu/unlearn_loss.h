// The forget/retain embedding-distance loss on the CPU: kernels on raw pointers and sizes.
#pragma once
#include <cstdint>

#include "scalar.h"
#include "../common/unlearn_loss.h"

namespace fastforget {

// Columns are cut into chunks of this many elements: a task is one (row, chunk) pair, so one long
// row still spreads over every thread, and the per-chunk partial sums make the result independent
// of the thread count (bitwise deterministic).
constexpr int64_t kChunk = 16384;
inline int64_t num_chunks(int64_t cols) { return cols == 0 ? 1 : (cols + kChunk - 1) / kChunk; }

// For tasks [task_begin, task_end): partial[task] = sum of (student - target)^2 over the chunk,
// and the gradient of the chunk when args.grad is set (n_forget: forget rows in the batch).
void unlearn_loss_chunks(const UnlearnLossArgs& args, int64_t n_forget, int64_t task_begin, int64_t task_end,
                         float* partial);

// grad[row] *= scale of the row's set, for tasks [task_begin, task_end); a set whose scale is
// exactly 1 is skipped without touching memory.
void scale_rows_chunks(void* grad, DType dtype, const uint8_t* is_forget, int64_t cols, float scale_retain,
                       float scale_forget, int64_t task_begin, int64_t task_end);

}  // namespace fastforget
