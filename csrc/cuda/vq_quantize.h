// Vector quantisation on NVIDIA GPUs (../common/vq_quantize.h): a launcher on raw pointers, no torch.
#pragma once
#include <cuda_runtime.h>

#include "../common/vq_quantize.h"

namespace fastforget {

// Two launches on `stream`: the codes' squared norms into `norms` (codes floats), then a block per
// 64 rows: float32 FMA tiles of z . e through shared memory over every code, each row's argmin
// in the tiles' epilogue.
cudaError_t launch_vq_quantize(const VqQuantizeArgs& args, float* norms, cudaStream_t stream);

}  // namespace fastforget
