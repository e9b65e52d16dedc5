// GroupNorm, scale-shift and SiLU on NVIDIA GPUs (../common/group_norm.h): launchers on raw
// pointers, no torch. The parameters and FiLM arrive as float32 (the binding converts the few
// values that are not), so only x's dtype is a template argument.
#pragma once
#include <cuda_runtime.h>

#include "../common/group_norm.h"

namespace fastforget {

// One block per (image, group) pair: the statistics in one read of the pair's block, y in a
// second. Writes y, mean and rstd.
cudaError_t launch_group_norm_forward(const GroupNormArgs& args, cudaStream_t stream);

// One block per pair: one read of x and dy for the per-channel sums, a second for dx. Writes dx
// and the (4, B, C) sums.
cudaError_t launch_group_norm_backward(const GroupNormArgs& args, cudaStream_t stream);

}  // namespace fastforget
