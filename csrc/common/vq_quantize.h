// Vector quantisation's arguments, shared by the CPU and CUDA kernels:
//
//   indices[i] = argmin_j (||e_j||^2 - 2 z_i . e_j)     (= argmin_j ||z_i - e_j||^2)
//
// z (rows, dim) and the codebook (codes, dim) contiguous, each float32, bfloat16 or float16, read
// as float32; products and sums in float32. A tie goes to the lowest j (as torch.argmin). The
// (rows, codes) distances are never written: each kernel keeps a tile of them and the running
// (min, argmin) of its rows.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace fastforget {

struct VqQuantizeArgs {
  const void* z; DType z_dtype;
  const void* codebook; DType codebook_dtype;
  int64_t rows, codes, dim;
  int64_t* indices;                    // (rows,), the output
};

}  // namespace fastforget
