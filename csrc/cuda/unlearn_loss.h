// The forget/retain embedding-distance loss on NVIDIA GPUs: launchers on raw pointers, no torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common/unlearn_loss.h"

namespace fastforget {

// The most tensors one launch takes (the table travels in the kernel's arguments).
constexpr int kMaxLossTensors = 32;

// Floats of scratch the forward pass needs: a partial sum per (tensor, row, chunk).
int64_t unlearn_loss_scratch_floats(const UnlearnLossArgs* tensors, int count);

// Writes the three 0-d float32 results (loss, retain_loss, forget_loss, each the sum over the
// tensors) and the gradients, for a table of 1 to kMaxLossTensors tensors sharing rows, is_forget,
// weights, normalisation and one student and one target dtype. Two launches (three with more than
// 4096 rows), no host synchronisation; scratch holds unlearn_loss_scratch_floats() floats.
cudaError_t launch_unlearn_loss_forward(const UnlearnLossArgs* tensors, int count, float* scratch, int* count_scratch,
                                        float* loss, float* retain_loss, float* forget_loss, cudaStream_t stream);

// grads[i] *= (grad_loss * w + grad_set) / c per row (see unlearn_loss.h), read on the device;
// rows whose factor is exactly 1 are left untouched. Null grad pointers count as 0. One launch.
cudaError_t launch_unlearn_loss_scale_grad(void* const* grads, const int64_t* cols, int count, DType dtype,
                                           const uint8_t* is_forget, int64_t rows, const float* grad_loss,
                                           const float* grad_retain, const float* grad_forget, float retain_weight,
                                           float forget_weight, cudaStream_t stream);

}  // namespace fastforget
