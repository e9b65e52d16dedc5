// Multi-head attention over a packed qkv projection on the CPU, for the short sequences of masked
// encoders (MAE keeps 1 + L/4 tokens: 17 on 16 px digits, 50 at 224 px). One (image, head) pair
// is one task: its q, k, v are read once into float tiles that stay in L1, so the step is a few
// thousand vector instructions where ATen's flash kernel pays blocking and per-block bookkeeping
// made for long sequences. CPU only: on GPUs torch's scaled_dot_product_attention (FlashAttention,
// cuDNN) is the fast path and fastforget does not duplicate it.
//
// qkv (batch, tokens, 3, heads, head_dim) contiguous: the qkv Linear's output as it comes.
// out (batch, tokens, heads, head_dim): the proj Linear's input as it goes. lse (batch, heads,
// tokens) float32: each query row's log-sum-exp of its scaled scores, which backward recomputes
// the probabilities from. grad_qkv has qkv's layout, so no gradient is permuted either.
#pragma once
#include <cstdint>

#include "../common/dtype.h"

namespace fastforget {

// The longest sequence and widest head the kernel takes: a pair's tiles stay in L1/L2, and longer
// sequences are flash attention's work (the op sends them to torch's). Multiples of 16.
constexpr int64_t kAttentionMaxTokens = 512, kAttentionMaxHeadDim = 256;

struct AttentionArgs {
  const void* qkv; DType dtype;  // every tensor but lse has this dtype
  void* out;                     // written by forward, read by backward
  const void* grad_out;          // backward only
  float* lse;
  void* grad_qkv;                // backward only
  int64_t batch, tokens, heads, head_dim;
  float scale;                   // softmax(scale q k^T)
};

// (image, head) pairs [pair_begin, pair_end), pair = image * heads + head.
void attention_forward_pairs(const AttentionArgs& args, int64_t pair_begin, int64_t pair_end);
void attention_backward_pairs(const AttentionArgs& args, int64_t pair_begin, int64_t pair_end);

}  // namespace fastforget
