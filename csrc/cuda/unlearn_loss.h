// The forget/retain embedding-distance loss on NVIDIA GPUs: launchers on raw pointers, no torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/unlearn_loss.h"

namespace fastforget {

// Floats of scratch the forward pass needs (per-chunk partial sums) and an int for the row count.
int64_t unlearn_loss_scratch_floats(int64_t rows, int64_t cols);

// Writes the three 0-d float32 results (loss, retain_loss, forget_loss) and the gradient.
// Two launches, no host synchronisation; scratch holds unlearn_loss_scratch_floats() floats.
cudaError_t launch_unlearn_loss_forward(const UnlearnLossArgs& args, float* scratch, int* count_scratch, float* loss,
                                        float* retain_loss, float* forget_loss, cudaStream_t stream);

// grad *= (grad_loss * w + grad_set) / c per row (see unlearn_loss.h), read on the device;
// rows whose factor is exactly 1 are left untouched. Null grad pointers count as 0.
cudaError_t launch_unlearn_loss_scale_grad(void* grad, DType dtype, const uint8_t* is_forget, int64_t rows, int64_t cols,
                                    const float* grad_loss, const float* grad_retain, const float* grad_forget,
                                    float retain_weight, float forget_weight, cudaStream_t stream);

}  // namespace fastforget
