// The teacher batch on the CPU: kernels on raw pointers and sizes.
#pragma once
#include <cstdint>

#include "../common/teacher_batch.h"

namespace fastforget {

constexpr int64_t kStatsChunk = 1 << 16;  // elements per statistics task
constexpr int64_t kNoiseBlock = 256;  // elements per noise block

// z[0, n) = the raw noise (standard normal, or uniform in [0, 1)) of stream elements [i0, i0 + n),
// n <= kNoiseBlock: Philox over consecutive counters and Box-Muller as branch-free polynomials,
// loops the compiler vectorises; within a few float ulps of philox.h's normal_noise / uniform_noise.
void philox_noise_block(Noise noise, uint64_t i0, int64_t n, uint64_t seed, float* z);
void philox_normal_block(uint64_t i0, int64_t n, uint64_t seed, float* z);
inline int64_t stats_chunks(int64_t numel) { return (numel + kStatsChunk - 1) / kStatsChunk; }

// moments[c] for chunks [chunk_begin, chunk_end) of the flat batch.
void teacher_batch_moments(const void* images, DType dtype, int64_t numel, int64_t chunk_begin, int64_t chunk_end,
                           Moments* moments);

// out for rows [row_begin, row_end), given the batch's mean and (unbiased) std.
void teacher_batch_rows(const TeacherBatchArgs& args, float mean, float std, int64_t row_begin, int64_t row_end);

}  // namespace fastforget
