// Masked-patch encoding on the CPU: gather the kept patches and write the epilogue rows; the
// bindings then run the GEMM (ATen's BLAS) accumulating onto them.
#pragma once
#include <cstdint>

#include "../common/patch_embed.h"

namespace fastforget {

// Rows [row_begin, row_end) of both outputs (see csrc/common/patch_embed.h).
void gather_patches(const PatchEmbedArgs& args, int64_t row_begin, int64_t row_end);

}  // namespace fastforget
