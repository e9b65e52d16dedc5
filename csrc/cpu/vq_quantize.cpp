#include "vq_quantize.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "scalar.h"
#include "vec.h"

namespace fastforget {
namespace {

constexpr int kTileRows = 8;  // 8 rows x 2 panels: 16 accumulators, half the AVX-512 registers

inline vec loadu(const float* p) {  // no alignment assumed
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vec broadcast(float f) {  // vec.h's splat adds f to 0, one more instruction per use here
  return f - vec{};
}

inline ivec lane_ids() {
  ivec v;
  for (int j = 0; j < kLanes; ++j) v[j] = j;
  return v;
}

// Keeps, per lane, the first code of the smallest distance: codes come in increasing order and
// only a strictly smaller distance replaces the one held.
inline void keep_min(vec d, ivec ids, vec& best, ivec& arg) {
  const ivec smaller = d < best;
  best = smaller ? d : best;
  arg = smaller ? ids : arg;
}

// One register tile: rows z[0..8) (row stride dim) against two panels starting at code `code`,
// z . e over the whole dim, then each row's running (min, argmin) updated with its 32 distances.
inline void tile(const float* z, int64_t dim, const float* panels, const float* norms, int32_t code, vec* best,
                 ivec* arg) {
  vec acc0[kTileRows] = {}, acc1[kTileRows] = {};
  const float* p0 = panels;
  const float* p1 = panels + dim * kVqPanel;
  for (int64_t k = 0; k < dim; ++k) {
    const vec b0 = loadu(p0 + k * kVqPanel), b1 = loadu(p1 + k * kVqPanel);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r) {
      const vec zr = broadcast(z[r * dim + k]);
      acc0[r] += zr * b0;
      acc1[r] += zr * b1;
    }
  }
  const vec n0 = loadu(norms + code), n1 = loadu(norms + code + kVqPanel);
  const ivec ids0 = lane_ids() + code, ids1 = ids0 + int32_t(kVqPanel);
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r) {
    keep_min(n0 - 2.0f * acc0[r], ids0, best[r], arg[r]);
    keep_min(n1 - 2.0f * acc1[r], ids1, best[r], arg[r]);
  }
}

// The lanes' (min, argmin) of one row merged: the smallest distance, the lowest code among equals.
inline int64_t row_argmin(vec best, ivec arg) {
  float m = best[0];
  int32_t i = arg[0];
  for (int j = 1; j < kLanes; ++j)
    if (best[j] < m || (best[j] == m && arg[j] < i)) m = best[j], i = arg[j];
  return i;
}

// Codes per chunk: the chunk's panels (about 128 KiB) stay in L2 while the task's rows pass them.
int64_t chunk_codes(int64_t dim) {
  return std::max<int64_t>(2 * kVqPanel, (32768 / std::max<int64_t>(dim, 1)) / (2 * kVqPanel) * (2 * kVqPanel));
}

template <typename T>
void task(const VqQuantizeArgs& a, const float* packed, int64_t t) {
  const int64_t dim = a.dim, first = t * kVqTaskRows, rows = std::min(kVqTaskRows, a.rows - first);
  const int64_t padded = (rows + kTileRows - 1) / kTileRows * kTileRows;
  std::vector<float> z(size_t(padded * dim), 0.0f);  // the rows in float32; padding rows are zeros
  const T* src = static_cast<const T*>(a.z) + first * dim;
  for (int64_t i = 0; i < rows * dim; ++i) z[i] = to_float(src[i]);
  const float* norms = packed;
  const float* panels = packed + vq_panels(a) * kVqPanel;
  const int64_t codes = vq_panels(a) * kVqPanel, chunk = chunk_codes(dim);
  vec best[kVqTaskRows];
  ivec arg[kVqTaskRows];
  for (int64_t r = 0; r < padded; ++r) best[r] = splat(std::numeric_limits<float>::infinity()), arg[r] = ivec{};
  for (int64_t c0 = 0; c0 < codes; c0 += chunk)
    for (int64_t r = 0; r < padded; r += kTileRows)
      for (int64_t c = c0; c < std::min(codes, c0 + chunk); c += 2 * kVqPanel)
        tile(z.data() + r * dim, dim, panels + c * dim, norms, int32_t(c), best + r, arg + r);
  for (int64_t r = 0; r < rows; ++r) a.indices[first + r] = row_argmin(best[r], arg[r]);
}

template <typename T>
void pack(const VqQuantizeArgs& a, float* packed, int64_t p) {
  const int64_t dim = a.dim;
  float* norms = packed + p * kVqPanel;
  float* panel = packed + vq_panels(a) * kVqPanel + p * dim * kVqPanel;
  const T* e = static_cast<const T*>(a.codebook);
  vec norm = {};
  for (int64_t k = 0; k < dim; ++k) {
    vec v = {};
    for (int j = 0; j < kLanes; ++j) {
      const int64_t code = p * kVqPanel + j;
      v[j] = code < a.codes ? to_float(e[code * dim + k]) : 0.0f;
    }
    std::memcpy(panel + k * kVqPanel, &v, sizeof(v));
    norm += v * v;
  }
  for (int j = 0; j < kLanes; ++j)
    norms[j] = p * kVqPanel + j < a.codes ? norm[j] : std::numeric_limits<float>::infinity();
}

}  // namespace

int64_t vq_panels(const VqQuantizeArgs& a) { return (a.codes + 2 * kVqPanel - 1) / (2 * kVqPanel) * 2; }

int64_t vq_packed_floats(const VqQuantizeArgs& a) { return vq_panels(a) * kVqPanel * (1 + a.dim); }

void vq_pack_panels(const VqQuantizeArgs& a, float* packed, int64_t begin, int64_t end) {
  dispatch_dtype(a.codebook_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (int64_t p = begin; p < end; ++p) pack<T>(a, packed, p);
  });
}

void vq_quantize_tasks(const VqQuantizeArgs& a, const float* packed, int64_t begin, int64_t end) {
  dispatch_dtype(a.z_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (int64_t t = begin; t < end; ++t) task<T>(a, packed, t);
  });
}

}  // namespace fastforget
