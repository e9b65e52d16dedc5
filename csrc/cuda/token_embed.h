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

// Adds each row's dx into d_word (vocab, dim) and d_pos (1 + length, dim), float32, zeroed by the
// caller, with atomics (the order of the additions varies from run to run); writes partial
// (blocks, 2, dim): each block's sums of dy * x_hat and dy (ln_weight's and ln_bias's gradients).
cudaError_t launch_token_embed_backward(const TokenEmbedArgs& args, float* d_word, float* d_pos, float* partial,
                                        cudaStream_t stream);

}  // namespace fastforget
