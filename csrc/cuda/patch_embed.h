// Masked-patch encoding on NVIDIA GPUs: gather the kept patches and write the epilogue rows; the
// bindings then run the GEMM (cuBLAS) accumulating onto them. Launchers on raw pointers, no torch.
#pragma once
#include <cuda_runtime.h>

#include "../common/patch_embed.h"

namespace fastforget {

cudaError_t launch_gather_patches(const PatchEmbedArgs& args, cudaStream_t stream);

}  // namespace fastforget
