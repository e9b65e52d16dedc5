// The teacher batch on the CPU: kernels on raw pointers and sizes.
#pragma once
#include <cstdint>

#include "../common/teacher_batch.h"

namespace fastforget {

constexpr int64_t kStatsChunk = 1 << 16;  // elements per statistics task
inline int64_t stats_chunks(int64_t numel) { return (numel + kStatsChunk - 1) / kStatsChunk; }

// moments[c] for chunks [chunk_begin, chunk_end) of the flat batch.
void teacher_batch_moments(const void* images, DType dtype, int64_t numel, int64_t chunk_begin, int64_t chunk_end,
                           Moments* moments);

// out for rows [row_begin, row_end), given the batch's mean and (unbiased) std.
void teacher_batch_rows(const TeacherBatchArgs& args, float mean, float std, int64_t row_begin, int64_t row_end);

}  // namespace fastforget
