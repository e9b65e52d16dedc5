#include "token_embed.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "scalar.h"
#include "vec_io.h"

namespace fastforget {
namespace {

template <typename T>
void to_floats(const void* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(static_cast<const T*>(src)[i]);
}

// x = word[id] + pos[position] in float; returns the row's sum.
template <typename T>
float row_sum(const TokenEmbedArgs& a, TokenRow row, float* x) {
  const int64_t D = a.dim, vd = D / kLanes * kLanes;
  const T* w = static_cast<const T*>(a.word) + row.id * D;
  const T* p = static_cast<const T*>(a.pos) + row.position * D;
  vec acc = {};
  float tail = 0.0f;
  for (int64_t i = 0; i < vd; i += kLanes) {
    const vec v = load(w + i) + load(p + i);
    store(x + i, v);
    acc += v;
  }
  for (int64_t i = vd; i < D; ++i) {
    x[i] = to_float(w[i]) + to_float(p[i]);
    tail += x[i];
  }
  return lane_sum(acc) + tail;
}

template <typename T>
void forward_rows(const TokenEmbedArgs& a, int64_t begin, int64_t end) {
  const int64_t D = a.dim, vd = D / kLanes * kLanes;
  std::vector<float> buf(3 * D);
  float *x = buf.data(), *lw = x + D, *lb = lw + D;
  to_floats<T>(a.ln_weight, D, lw);
  to_floats<T>(a.ln_bias, D, lb);
  for (int64_t r = begin; r < end; ++r) {
    const float mean = row_sum<T>(a, token_row(a, r), x) / float(D);
    vec acc = {};
    float tail = 0.0f;
    for (int64_t i = 0; i < vd; i += kLanes) {
      const vec d = load(x + i) - mean;
      acc += d * d;
    }
    for (int64_t i = vd; i < D; ++i) tail += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.0f / std::sqrt((lane_sum(acc) + tail) / float(D) + a.eps);
    a.mean[r] = mean;
    a.rstd[r] = rstd;
    T* y = static_cast<T*>(a.out) + r * D;
    for (int64_t i = 0; i < vd; i += kLanes) store(y + i, (load(x + i) - mean) * rstd * load(lw + i) + load(lb + i));
    for (int64_t i = vd; i < D; ++i) y[i] = from_float<T>((x[i] - mean) * rstd * lw[i] + lb[i]);
  }
}

// LayerNorm's backward per row: dx = rstd (g - mean(g) - x_hat mean(g x_hat)), g = dy * ln_weight.
template <typename T>
void backward_blocks(const TokenEmbedArgs& a, float* dx, float* partial, int64_t begin, int64_t end) {
  const int64_t D = a.dim, vd = D / kLanes * kLanes, rows = token_rows(a);
  std::vector<float> buf(2 * D);
  float *x = buf.data(), *lw = x + D;
  to_floats<T>(a.ln_weight, D, lw);
  for (int64_t blk = begin; blk < end; ++blk) {
    float* pw = partial + blk * 2 * D;  // the block's sums of dy x_hat, then of dy
    float* pb = pw + D;
    std::fill(pw, pw + 2 * D, 0.0f);
    for (int64_t r = blk * kTokenRowBlock; r < std::min(rows, (blk + 1) * kTokenRowBlock); ++r) {
      row_sum<T>(a, token_row(a, r), x);
      const float mean = a.mean[r], rstd = a.rstd[r];
      const T* dy = static_cast<const T*>(a.dy) + r * D;
      float* dxr = dx + r * D;
      vec s_g = {}, s_gx = {};
      float t_g = 0.0f, t_gx = 0.0f;
      for (int64_t i = 0; i < vd; i += kLanes) {  // x becomes x_hat, dx holds g for now
        const vec xh = (load(x + i) - mean) * rstd, d = load(dy + i), g = d * load(lw + i);
        store(x + i, xh);
        store(dxr + i, g);
        s_g += g;
        s_gx += g * xh;
        store(pw + i, load(pw + i) + d * xh);
        store(pb + i, load(pb + i) + d);
      }
      for (int64_t i = vd; i < D; ++i) {
        const float xh = (x[i] - mean) * rstd, d = to_float(dy[i]), g = d * lw[i];
        x[i] = xh;
        dxr[i] = g;
        t_g += g;
        t_gx += g * xh;
        pw[i] += d * xh;
        pb[i] += d;
      }
      const float mean_g = (lane_sum(s_g) + t_g) / float(D), mean_gx = (lane_sum(s_gx) + t_gx) / float(D);
      for (int64_t i = 0; i < vd; i += kLanes)
        store(dxr + i, (load(dxr + i) - mean_g - load(x + i) * mean_gx) * rstd);
      for (int64_t i = vd; i < D; ++i) dxr[i] = (dxr[i] - mean_g - x[i] * mean_gx) * rstd;
    }
  }
}

template <typename T>
void ln_grads(const TokenEmbedArgs& a, const float* partial, void* d_ln_weight, void* d_ln_bias) {
  const int64_t D = a.dim, blocks = token_row_blocks(a);
  std::vector<float> sums(2 * D, 0.0f);
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t i = 0; i < 2 * D; ++i) sums[i] += partial[blk * 2 * D + i];
  for (int64_t i = 0; i < D; ++i) {
    static_cast<T*>(d_ln_weight)[i] = from_float<T>(sums[i]);
    static_cast<T*>(d_ln_bias)[i] = from_float<T>(sums[D + i]);
  }
}

constexpr int64_t kScatterColumns = 64;  // a heavy row (mask_id's) splits into this many-column tasks

// Tasks [begin, end) of (column chunk, destination) pairs, chunk-major so that one destination's
// chunks fall to different threads.
template <typename T>
void scatter_rows(const float* dx, int64_t dim, const int64_t* offsets, const int64_t* sources, void* grad,
                  int64_t destinations, int64_t begin, int64_t end) {
  float acc[kScatterColumns];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t v = task % destinations, c0 = task / destinations * kScatterColumns;
    const int64_t n = std::min(kScatterColumns, dim - c0);
    std::fill(acc, acc + n, 0.0f);
    for (int64_t s = offsets[v]; s < offsets[v + 1]; ++s) {
      const float* src = dx + sources[s] * dim + c0;
      if (n == kScatterColumns) {
        for (int64_t i = 0; i < kScatterColumns; i += kLanes) store(acc + i, load(acc + i) + load(src + i));
      } else {
        for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
      }
    }
    T* out = static_cast<T*>(grad) + v * dim + c0;
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(acc[i]);
  }
}

void counting_sort(const int64_t* keys, int64_t n, int64_t range, int64_t* offsets, int64_t* sources) {
  std::fill(offsets, offsets + range + 1, int64_t(0));
  for (int64_t r = 0; r < n; ++r) ++offsets[keys[r] + 1];
  for (int64_t v = 0; v < range; ++v) offsets[v + 1] += offsets[v];
  std::vector<int64_t> cursor(offsets, offsets + range);
  for (int64_t r = 0; r < n; ++r) sources[cursor[keys[r]]++] = r;
}

}  // namespace

#define FF_TOKEN_DISPATCH(dtype, call) \
  dispatch_dtype(dtype, [&](auto* tag) { using T = std::remove_pointer_t<decltype(tag)>; call; })

void token_embed_forward_rows(const TokenEmbedArgs& a, int64_t begin, int64_t end) {
  FF_TOKEN_DISPATCH(a.dtype, forward_rows<T>(a, begin, end));
}

void token_embed_backward_blocks(const TokenEmbedArgs& a, float* dx, float* partial, int64_t begin, int64_t end) {
  FF_TOKEN_DISPATCH(a.dtype, backward_blocks<T>(a, dx, partial, begin, end));
}

void token_embed_ln_grads(const TokenEmbedArgs& a, const float* partial, void* d_ln_weight, void* d_ln_bias) {
  FF_TOKEN_DISPATCH(a.dtype, ln_grads<T>(a, partial, d_ln_weight, d_ln_bias));
}

void token_embed_sources(const TokenEmbedArgs& a, int64_t* word_offsets, int64_t* word_sources, int64_t* pos_offsets,
                         int64_t* pos_sources) {
  const int64_t rows = token_rows(a);
  std::vector<int64_t> ids(rows), positions(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const TokenRow row = token_row(a, r);
    ids[r] = row.id;
    positions[r] = row.position;
  }
  counting_sort(ids.data(), rows, a.vocab, word_offsets, word_sources);
  counting_sort(positions.data(), rows, a.length + 1, pos_offsets, pos_sources);
}

int64_t token_embed_scatter_tasks(int64_t destinations, int64_t dim) {
  return destinations * ((dim + kScatterColumns - 1) / kScatterColumns);
}

void token_embed_scatter_rows(const float* dx, int64_t dim, const int64_t* offsets, const int64_t* sources, void* grad,
                              DType dtype, int64_t destinations, int64_t begin, int64_t end) {
  FF_TOKEN_DISPATCH(dtype, scatter_rows<T>(dx, dim, offsets, sources, grad, destinations, begin, end));
}

#undef FF_TOKEN_DISPATCH

}  // namespace fastforget
