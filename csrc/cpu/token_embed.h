// MAGE's token embedding on the CPU (../common/token_embed.h): kernels on raw pointers and sizes.
// Forward: a row per task step, read once into float, two passes for the statistics (mean, then
// squared deviations), one to write. Backward, deterministic for any thread count:
//   1. fixed blocks of kTokenRowBlock rows: each row's dx (float32, into a (rows, dim) buffer) and
//      the block's partial sums of the LayerNorm parameters' gradients;
//   2. the blocks' partials summed in block order;
//   3. each word / position row owned by one task, which adds the dx of the rows that read it in
//      row order (a counting sort lists them) and writes the gradient in the weights' dtype.
#pragma once
#include <cstdint>

#include "../common/token_embed.h"

namespace fastforget {

constexpr int64_t kTokenRowBlock = 64;

inline int64_t token_row_blocks(const TokenEmbedArgs& a) {
  return (token_rows(a) + kTokenRowBlock - 1) / kTokenRowBlock;
}

// Rows [begin, end): writes out, mean, rstd.
void token_embed_forward_rows(const TokenEmbedArgs& a, int64_t begin, int64_t end);

// Row blocks [begin, end): dx (rows, dim) and partial (blocks, 2, dim): the block's sums of
// dy * x_hat (ln_weight's gradient) and of dy (ln_bias's).
void token_embed_backward_blocks(const TokenEmbedArgs& a, float* dx, float* partial, int64_t begin, int64_t end);

// d_ln_weight and d_ln_bias (dim,) in a.dtype: the blocks' partials summed in block order.
void token_embed_ln_grads(const TokenEmbedArgs& a, const float* partial, void* d_ln_weight, void* d_ln_bias);

// The rows that read each word row (and position row), in row order, as a counting sort:
// sources[offsets[v], offsets[v + 1]) for word row v; word_offsets (vocab + 1), pos_offsets
// (length + 2), each sources (rows).
void token_embed_sources(const TokenEmbedArgs& a, int64_t* word_offsets, int64_t* word_sources,
                         int64_t* pos_offsets, int64_t* pos_sources);

// A (destinations, dim) gradient in `dtype`: row v is the sum in source order of dx's rows
// sources[offsets[v], offsets[v + 1]), zero when none. Tasks [begin, end) of
// token_embed_scatter_tasks: (column chunk, row) pairs, so a row read by most of the batch
// (mask_id's) spreads over threads.
int64_t token_embed_scatter_tasks(int64_t destinations, int64_t dim);
void token_embed_scatter_rows(const float* dx, int64_t dim, const int64_t* offsets, const int64_t* sources,
                              void* grad, DType dtype, int64_t destinations, int64_t begin, int64_t end);

}  // namespace fastforget
