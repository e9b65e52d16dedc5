// The diffusion family's step inputs on NVIDIA GPUs (../common/diffusion_inputs.h): a launcher on
// raw pointers, no torch.
#pragma once
#include <cuda_runtime.h>

#include "../common/diffusion_inputs.h"

namespace fastforget {

// One launch writes both outputs: blocks copy each image's condition into both, or compute a
// chunk of its noisy channels (Philox noise drawn in place, or the given noise read).
cudaError_t launch_diffusion_inputs(const DiffusionInputsArgs& args, cudaStream_t stream);

}  // namespace fastforget
