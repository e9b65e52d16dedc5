// GroupNorm, scale-shift and SiLU on the CPU (../common/group_norm.h): kernels on raw pointers
// and sizes. An (image, group) pair is one task (channels last: an image), read while it stays in
// cache: forward takes the block's statistics (two passes over it, mean then squared deviations, in float) and writes y in
// one more; backward sums per (image, channel) and per group, then writes dx. Statistics and sums
// accumulate in float, 16 lanes in a fixed order: bitwise the same for any thread count.
#pragma once
#include <cstdint>

#include "../common/group_norm.h"

namespace fastforget {

// Tasks [begin, end): of the batch * groups (image, group) pairs, or, channels last, of the images
// (an image's groups interleave in memory: one pass over it serves them all).
void group_norm_forward_tasks(const GroupNormArgs& a, int64_t begin, int64_t end);
void group_norm_backward_tasks(const GroupNormArgs& a, int64_t begin, int64_t end);

}  // namespace fastforget
