// The teacher batch on NVIDIA GPUs: launchers on raw pointers, no torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/teacher_batch.h"

namespace fastforget {

// Bytes of scratch the statistics need.
int64_t teacher_batch_scratch_bytes(int64_t numel);

// Statistics pass (normal and constant noise), a one-block merge, then the output pass: three
// launches, no host synchronisation.
cudaError_t launch_teacher_batch(const TeacherBatchArgs& args, void* scratch, cudaStream_t stream);

}  // namespace fastforget
