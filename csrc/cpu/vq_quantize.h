// Vector quantisation on the CPU (../common/vq_quantize.h): the codebook packed once per call
// (float32, transposed in panels of 16 codes, with its squared norms), then tasks of rows, each a
// GEMM of register tiles (8 rows x 32 codes) with the running argmin in the tile's epilogue.
// Every sum runs in a fixed order: the same indices for any thread count.
#pragma once
#include <cstdint>

#include "../common/vq_quantize.h"

namespace fastforget {

constexpr int64_t kVqPanel = 16;     // codes per packed panel: one vector
constexpr int64_t kVqTaskRows = 32;  // rows per task

int64_t vq_panels(const VqQuantizeArgs& a);        // the codes padded to a multiple of 32, in panels
int64_t vq_packed_floats(const VqQuantizeArgs& a);  // the packed codebook's size: norms, then panels

// Panels [begin, end) into `packed` (vq_packed_floats floats): padding codes get norm +inf.
void vq_pack_panels(const VqQuantizeArgs& a, float* packed, int64_t begin, int64_t end);

// Row tasks [begin, end), kVqTaskRows rows each, against the packed codebook.
void vq_quantize_tasks(const VqQuantizeArgs& a, const float* packed, int64_t begin, int64_t end);

}  // namespace fastforget
