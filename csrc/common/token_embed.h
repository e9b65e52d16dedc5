// MAGE's token embedding of the kept positions (fastforget/ops/token_embed.py), shared by the CPU
// and CUDA kernels:
//
//   out[b, t] = LN(word[id(b, t)] + pos[position(b, t)]),  t in [0, 1 + keep)
//
// Row t = 0 is the class token (class_id at position 0); row t = 1 + j is kept image position
// p = keep[b, j] at pos row 1 + p, with word id mask_id where masked[b, j], else tokens[b, p].
// Rows are numbered r = b * (1 + keep) + t. Sums and statistics are float32; forward saves each
// row's mean and rstd, backward recomputes the row from them.
#pragma once
#include <cstdint>

#include "dtype.h"

#ifndef FF_HOST_DEVICE
#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif
#endif

namespace fastforget {

struct TokenEmbedArgs {
  const int64_t* tokens;   // (batch, length) in [0, vocab)
  const int64_t* keep;     // (batch, keep) in [0, length)
  const uint8_t* masked;   // (batch, keep) 0 / 1
  const void* word; const void* pos;             // (vocab, dim), (1 + length, dim)
  const void* ln_weight; const void* ln_bias;    // (dim,); all four share dtype, as do out and dy
  DType dtype;
  int64_t batch, length, keep_count, dim, vocab, class_id, mask_id;
  float eps;
  void* out; float* mean; float* rstd;           // forward writes out (rows, dim), backward reads mean, rstd (rows,)
  const void* dy;                                // backward: (rows, dim)
};

FF_HOST_DEVICE int64_t token_rows(const TokenEmbedArgs& a) { return a.batch * (1 + a.keep_count); }

// The word row and the position row that output row r sums; {-1, -1} when its keep entry or its
// token is out of range (the CPU binding refuses those; the GPU kernels, which cannot without a
// host synchronisation, write the row as NaN and add nothing from it).
struct TokenRow { int64_t id, position; };

FF_HOST_DEVICE TokenRow token_row(const TokenEmbedArgs& a, int64_t r) {
  const int64_t b = r / (1 + a.keep_count), t = r % (1 + a.keep_count);
  if (t == 0) return TokenRow{a.class_id, 0};
  const int64_t k = b * a.keep_count + t - 1, p = a.keep[k];
  if (p < 0 || p >= a.length) return TokenRow{-1, -1};
  const int64_t id = a.masked[k] ? a.mask_id : a.tokens[b * a.length + p];
  return id < 0 || id >= a.vocab ? TokenRow{-1, -1} : TokenRow{id, 1 + p};
}

}  // namespace fastforget
