// MAGE's token embedding on NVIDIA GPUs (../common/token_embed.h): launchers on raw pointers, no
// torch. A row is one group of threads of a block (8 elements a thread, so up to
// kTokenEmbedMaxDim), several rows a block.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/token_embed.h"

namespace fastforget {

constexpr int64_t kTokenEmbedMaxDim = 4096;  // 512 threads of 8 elements for a row

// Writes out, mean and rstd.
cudaError_t launch_token_embed_forward(const TokenEmbedArgs& args, cudaStream_t stream);

// How many blocks backward runs: the rows of partial.
int64_t token_embed_backward_blocks(const TokenEmbedArgs& args);

// Writes dx (rows, dim) float32, each row's LayerNorm input gradient; word_key and pos_key (rows,):
// the word row and the position row it read (vocab and 1 + length for a row out of range, which
// sort past every weight row, so it adds nothing); and partial (blocks, 2, dim): each block's sums
// of dy * x_hat and dy (ln_weight's and ln_bias's gradients). No atomics: every sum in a fixed order.
cudaError_t launch_token_embed_backward(const TokenEmbedArgs& args, float* dx, int64_t* word_key, int64_t* pos_key,
                                        float* partial, cudaStream_t stream);

// grad (destinations, dim) in dtype: row v is the float32 sum of dx's rows perm[offsets[v],
// offsets[v + 1]) (offsets: destinations + 1 entries), in a fixed order, zero when empty. One block
// a (row, 128-column tile): deterministic, no atomics.
cudaError_t launch_token_embed_segment_sum(const float* dx, int64_t dim, const int64_t* perm, const int64_t* offsets,
                                           int64_t destinations, void* grad, DType dtype, cudaStream_t stream);

}  // namespace fastforget
