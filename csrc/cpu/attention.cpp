#include "attention.h"

#include <cmath>
#include <type_traits>
#include <vector>

#include "scalar.h"
#include "vec.h"

namespace fastforget {
namespace {

// A pair's tiles are padded with zeros to whole vectors (vec.h): keys to kv = 16 nv, features to
// 16 hv; the padded keys' probabilities are forced to zero, the padded features add nothing.

// Horizontal sums and maxima of RB vectors at once, in a fixed order (the same at any thread
// count). Four vectors share each shuffle: 8 shuffles for 4 results where one at a time takes 16.
template <typename Op>
inline vec halve(vec a, vec b, Op op) {  // lanes 0-7: a's two halves combined; 8-15: b's
  return op(__builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
            __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
}

template <int RB, typename Op>
inline void reduce_rows(const vec (&v)[RB], Op op, float (&out)[RB]) {
  if constexpr (RB == 4) {
    const vec a = halve(v[0], v[1], op), b = halve(v[2], v[3], op);
    // lanes 4r..4r+3: row r's partial results
    vec c = op(__builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
               __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    c = op(c, __builtin_shufflevector(c, c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    c = op(c, __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    for (int r = 0; r < 4; ++r) out[r] = c[4 * r];
  } else {
    for (int r = 0; r < RB; ++r) {
      vec c = halve(v[r], v[r], op);
      c = op(c, __builtin_shufflevector(c, c, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
      c = op(c, __builtin_shufflevector(c, c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
      c = op(c, __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
      out[r] = c[0];
    }
  }
}
inline vec add(vec a, vec b) { return a + b; }
inline vec larger(vec a, vec b) { return b > a ? b : a; }

// Keys past the sequence (padding) in key vector u: false lanes.
inline ivec real_keys(int64_t u, int64_t tokens) {
  const ivec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane + int32_t(u * kLanes) < int32_t(tokens);
}

// The most key and feature vectors a pair may have (attention.h's limits, in vectors).
constexpr int64_t kMaxKeyVecs = kAttentionMaxTokens / kLanes, kMaxFeatureVecs = kAttentionMaxHeadDim / kLanes;

// One pair's sizes; HV, NV > 0 fix them at compile time (then the row loops unroll and the row
// vectors live in registers), 0 takes them from the arguments.
template <int HV, int NV>
struct Tiles {
  static constexpr int kMaxNV = NV ? NV : kMaxKeyVecs, kMaxHV = HV ? HV : kMaxFeatureVecs;
  int64_t tokens, head_dim, hv_, nv_, dim, row;
  // Feature and key vectors: the template's constants when fixed (so loops over them unroll).
  int64_t hv() const { return HV ? HV : hv_; }
  int64_t nv() const { return NV ? NV : nv_; }
  explicit Tiles(const AttentionArgs& a)
      : tokens(a.tokens), head_dim(a.head_dim), hv_(vecs(a.head_dim)), nv_(vecs(a.tokens)),
        dim(a.heads * a.head_dim), row(3 * a.heads * a.head_dim) {}
  // Element offsets in qkv of the pair's q row 0 (k at + dim, v at + 2 dim; rows row apart) and in out.
  int64_t qkv0(const AttentionArgs& a, int64_t pair) const {
    return (pair / a.heads) * tokens * row + (pair % a.heads) * head_dim;
  }
  int64_t out0(const AttentionArgs& a, int64_t pair) const {
    return (pair / a.heads) * tokens * dim + (pair % a.heads) * head_dim;
  }
};

// Part `part` (0 q, 1 k, 2 v) of a pair, times scale, as float rows (tokens, 16 hv) and, when
// cols is given, also as columns (16 hv, 16 nv); the padding is left as it is (zero).
template <typename T, typename W>
void load(const T* src, const W& w, int64_t part, float scale, vec* rows, vec* cols = nullptr) {
  float* r = reinterpret_cast<float*>(rows);
  const int64_t row_stride = w.hv() * kLanes, col_stride = w.nv() * kLanes;
  for (int64_t t = 0; t < w.tokens; ++t) {
    const T* __restrict__ x = src + t * w.row + part * w.dim;
    float* __restrict__ rt = r + t * row_stride;
#pragma omp simd
    for (int64_t d = 0; d < w.head_dim; ++d) rt[d] = scale * to_float(x[d]);
  }
  if (!cols) return;
  float* c = reinterpret_cast<float*>(cols);
  for (int64_t t = 0; t < w.tokens; ++t)
    for (int64_t d = 0; d < w.head_dim; ++d) c[d * col_stride + t] = r[t * row_stride + d];
}

// A pair's q (times scale), k and v as float rows; k also as columns, v too when vt is given.
template <typename T, typename W>
void load_pair(const T* src, const W& w, float scale, vec* q, vec* k, vec* kt, vec* v, vec* vt) {
  load(src, w, 0, scale, q);
  load(src, w, 1, 1.0f, k, kt);
  load(src, w, 2, 1.0f, v, vt);
}

template <typename T>
void store(const vec* v, float scale, int64_t n, T* dst) {
  const float* f = reinterpret_cast<const float*>(v);
  for (int64_t d = 0; d < n; ++d) dst[d] = from_float<T>(scale * f[d]);
}

// s[r][u] = the scores of query rows q[r] (RB rows of hv vectors) against key vector u of the
// columns kt (16 hv, nv): RB * nv independent accumulators, each column vector loaded once. They
// add up in locals (registers, when nv is fixed) and are stored once: s's lanes are read one by
// one afterwards, so s itself lives in memory.
template <int RB, typename W>
inline void scores(const vec* q, const vec* kt, const W& w, vec (*s)[W::kMaxNV]) {
  const float* qf = reinterpret_cast<const float*>(q);
  const int64_t nv = w.nv(), stride = w.hv() * kLanes;
  vec acc[RB][W::kMaxNV];
  for (int r = 0; r < RB; ++r)
    for (int64_t u = 0; u < nv; ++u) acc[r][u] = vec{};
  for (int64_t d = 0; d < stride; ++d)
    for (int64_t u = 0; u < nv; ++u) {
      const vec c = kt[d * nv + u];
      for (int r = 0; r < RB; ++r) acc[r][u] += qf[r * stride + d] * c;
    }
  for (int r = 0; r < RB; ++r)
    for (int64_t u = 0; u < nv; ++u) s[r][u] = acc[r][u];
}

// Query rows are taken RB at a time, sharing every load and giving the FMAs RB independent
// chains; the tiles' rows are padded to a multiple of RB with zeros, and padded rows are dropped.
template <typename T, int HV, int NV, int RB>
void forward_impl(const AttentionArgs& a, int64_t pair_begin, int64_t pair_end) {
  using W = Tiles<HV, NV>;
  const W w(a);
  const int64_t n = w.tokens, hv = w.hv(), nv = w.nv(), rows = (n + RB - 1) / RB * RB;
  std::vector<vec> work(3 * rows * hv + hv * kLanes * nv, vec{});  // zeros: the padding stays zero
  vec *q = work.data(), *k = q + rows * hv, *v = k + rows * hv, *kt = v + rows * hv;
  vec s[RB][W::kMaxNV], o[RB][W::kMaxHV];
  const T* qkv = static_cast<const T*>(a.qkv);
  T* out = static_cast<T*>(a.out);
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    load_pair(qkv + w.qkv0(a, pair), w, a.scale, q, k, kt, v, nullptr);
    for (int64_t i = 0; i < n; i += RB) {
      scores<RB>(q + i * hv, kt, w, s);
      vec top[RB], total[RB];
      float m[RB], sum[RB];
      for (int r = 0; r < RB; ++r) {
        top[r] = splat(-INFINITY);  // NaN scores are passed over here and come back through e^(NaN - max)
        for (int64_t u = 0; u < nv; ++u) top[r] = real_keys(u, n) & (s[r][u] > top[r]) ? s[r][u] : top[r];
      }
      reduce_rows(top, larger, m);
      for (int r = 0; r < RB; ++r) {
        total[r] = vec{};
        for (int64_t u = 0; u < nv; ++u) {
          s[r][u] = real_keys(u, n) ? exp_nonpositive(s[r][u] - m[r]) : vec{};
          total[r] += s[r][u];
        }
        for (int64_t h = 0; h < hv; ++h) o[r][h] = vec{};
      }
      reduce_rows(total, add, sum);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < hv; ++h) {
          const vec vj = v[j * hv + h];
          for (int r = 0; r < RB; ++r) o[r][h] += s[r][j / kLanes][j % kLanes] * vj;
        }
      for (int r = 0; r < RB && i + r < n; ++r) {
        store(o[r], 1.0f / sum[r], w.head_dim, out + w.out0(a, pair) + (i + r) * w.dim);
        a.lse[pair * n + i + r] = m[r] + std::log(sum[r]);
      }
    }
  }
}

// dS = P (dP - D), D_i = dO_i . O_i; dQ = scale dS K, dK = dS^T (scale Q), dV = P^T dO, with P
// recomputed from the forward's log-sum-exp. dK and dV add up over query rows in float tiles.
// Padded query rows have dO = 0, hence dS = 0 and P dO = 0: they add nothing.
template <typename T, int HV, int NV, int RB>
void backward_impl(const AttentionArgs& a, int64_t pair_begin, int64_t pair_end) {
  using W = Tiles<HV, NV>;
  const W w(a);
  const int64_t n = w.tokens, hv = w.hv(), nv = w.nv(), rows = (n + RB - 1) / RB * RB;
  std::vector<vec> work(2 * rows * hv + 4 * n * hv + 2 * hv * kLanes * nv, vec{});
  vec *q = work.data(), *go = q + rows * hv, *k = go + rows * hv, *v = k + n * hv, *dk = v + n * hv;
  vec *dv = dk + n * hv, *kt = dv + n * hv, *vt = kt + hv * kLanes * nv;
  std::vector<float> dot(rows, 0.0f), lse(rows, 0.0f);  // D and the log-sum-exp per query row
  vec p[RB][W::kMaxNV], ds[RB][W::kMaxNV], dq[RB][W::kMaxHV];
  const T* qkv = static_cast<const T*>(a.qkv);
  const T* out = static_cast<const T*>(a.out);
  T* grad = static_cast<T*>(a.grad_qkv);
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    load_pair(qkv + w.qkv0(a, pair), w, a.scale, q, k, kt, v, vt);
    // dO as rows like q's (the row stride is dim, not 3 dim: the layout's row is overridden)
    W wo = w;
    wo.row = w.dim;
    load(static_cast<const T*>(a.grad_out) + w.out0(a, pair), wo, 0, 1.0f, go);
    const float* gof = reinterpret_cast<const float*>(go);
    for (int64_t t = 0; t < n; ++t) {
      const T* o = out + w.out0(a, pair) + t * w.dim;
      float sum = 0.0f;
      for (int64_t d = 0; d < w.head_dim; ++d) sum += gof[t * hv * kLanes + d] * to_float(o[d]);
      dot[t] = sum;
      lse[t] = a.lse[pair * n + t];
    }
    for (int64_t x = 0; x < 2 * n * hv; ++x) dk[x] = vec{};  // dk and dv
    T* grad_q = grad + w.qkv0(a, pair);
    for (int64_t i = 0; i < n; i += RB) {
      scores<RB>(q + i * hv, kt, w, p);
      scores<RB>(go + i * hv, vt, w, ds);  // dP
      for (int r = 0; r < RB; ++r) {
        for (int64_t u = 0; u < nv; ++u) {
          p[r][u] = real_keys(u, n) ? exp_nonpositive(p[r][u] - lse[i + r]) : vec{};
          ds[r][u] = p[r][u] * (ds[r][u] - dot[i + r]);
        }
        for (int64_t h = 0; h < hv; ++h) dq[r][h] = vec{};
      }
      for (int64_t h = 0; h < hv; ++h) {  // feature vector outermost: the rows' q and dO stay in registers
        vec qh[RB], goh[RB];
        for (int r = 0; r < RB; ++r) {
          qh[r] = q[(i + r) * hv + h];
          goh[r] = go[(i + r) * hv + h];
        }
        for (int64_t j = 0; j < n; ++j) {
          const vec kj = k[j * hv + h];
          vec dkj = dk[j * hv + h], dvj = dv[j * hv + h];
          for (int r = 0; r < RB; ++r) {
            const float dsj = ds[r][j / kLanes][j % kLanes], pj = p[r][j / kLanes][j % kLanes];
            dq[r][h] += dsj * kj;
            dkj += dsj * qh[r];
            dvj += pj * goh[r];
          }
          dk[j * hv + h] = dkj;
          dv[j * hv + h] = dvj;
        }
      }
      for (int r = 0; r < RB && i + r < n; ++r) store(dq[r], a.scale, w.head_dim, grad_q + (i + r) * w.row);
    }
    for (int64_t t = 0; t < n; ++t) {
      store(dk + t * hv, 1.0f, w.head_dim, grad_q + t * w.row + w.dim);
      store(dv + t * hv, 1.0f, w.head_dim, grad_q + t * w.row + 2 * w.dim);
    }
  }
}

// Fn<T, 1, nv, 4>::run for a pair of one feature vector (head_dim <= 16) and nv key vectors,
// nv = 1 .. NV, with the sizes fixed at compile time; the run-time-sized kernel past NV.
template <template <typename, int, int, int> class Fn, typename T, int NV>
void dispatch_keys(const AttentionArgs& a, int64_t nv, int64_t pair_begin, int64_t pair_end) {
  if constexpr (NV > 0) {
    if (nv == NV) return Fn<T, 1, NV, 4>::run(a, pair_begin, pair_end);
    dispatch_keys<Fn, T, NV - 1>(a, nv, pair_begin, pair_end);
  } else {
    Fn<T, 0, 0, 2>::run(a, pair_begin, pair_end);
  }
}

// Calls Fn<T, HV, NV, RB>::run with compile-time tile sizes for MAE's common shapes, else with
// run-time ones: heads of up to 16 features with up to 80 tokens (the digits model: 17 tokens in
// the encoder, 65 in the decoder), and ViT-B/L's 50 tokens of 64 features. RB: as many query rows
// as the row vectors of scores and outputs leave registers for (32 on AVX-512).
template <template <typename, int, int, int> class Fn>
void dispatch(const AttentionArgs& a, int64_t pair_begin, int64_t pair_end) {
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t hv = vecs(a.head_dim), nv = vecs(a.tokens);
    if (hv == 1) dispatch_keys<Fn, T, 5>(a, nv, pair_begin, pair_end);
    else if (hv == 4 && nv == 4) Fn<T, 4, 4, 4>::run(a, pair_begin, pair_end);
    else Fn<T, 0, 0, 2>::run(a, pair_begin, pair_end);
  });
}

template <typename T, int HV, int NV, int RB>
struct Forward { static void run(const AttentionArgs& a, int64_t b, int64_t e) { forward_impl<T, HV, NV, RB>(a, b, e); } };
template <typename T, int HV, int NV, int RB>
struct Backward { static void run(const AttentionArgs& a, int64_t b, int64_t e) { backward_impl<T, HV, NV, RB>(a, b, e); } };

}  // namespace

void attention_forward_pairs(const AttentionArgs& args, int64_t pair_begin, int64_t pair_end) {
  dispatch<Forward>(args, pair_begin, pair_end);
}

void attention_backward_pairs(const AttentionArgs& args, int64_t pair_begin, int64_t pair_end) {
  dispatch<Backward>(args, pair_begin, pair_end);
}

}  // namespace fastforget
