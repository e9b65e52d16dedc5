#include "group_norm.h"

#include <cmath>
#include <type_traits>
#include <vector>

#include "scalar.h"
#include "vec.h"

namespace fastforget {
namespace {

template <typename T>
inline vec load(const T* p) {
  vec v;
  for (int j = 0; j < kLanes; ++j) v[j] = to_float(p[j]);
  return v;
}

template <typename T>
inline void store(T* p, vec v) {
  for (int j = 0; j < kLanes; ++j) p[j] = from_float<T>(v[j]);
}

inline float lane_sum(vec v) {  // a fixed pairwise order
  float t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = v[j];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

template <typename T>
float param(const void* p, int64_t i, float missing) {
  return p ? to_float(static_cast<const T*>(p)[i]) : missing;
}

// The per-channel affine of the normalised block: z = x * a + b folds the mean, rstd, weight, bias
// and the FiLM scale and shift; n = x_hat * w + bias is what scale multiplies.
struct Channel {
  float w, bias, film, shift;  // weight, bias, 1 + scale, shift
};

template <typename P, typename F>
Channel channel(const GroupNormArgs& a, int64_t b, int64_t c) {
  const int64_t bc = b * a.channels + c;
  return Channel{param<P>(a.weight, c, 1.0f), param<P>(a.bias, c, 0.0f), 1.0f + param<F>(a.scale, bc, 0.0f),
                 param<F>(a.shift, bc, 0.0f)};
}

template <typename T, typename P, typename F>
void forward_pair(const GroupNormArgs& a, int64_t pair) {
  const int64_t b = pair / a.groups, g = pair % a.groups, per_group = a.channels / a.groups;
  const int64_t n = per_group * a.positions, vn = n / kLanes * kLanes;
  const T* x = static_cast<const T*>(a.x) + pair * n;
  vec acc = {};
  float tail = 0.0f;
  for (int64_t i = 0; i < vn; i += kLanes) acc += load(x + i);
  for (int64_t i = vn; i < n; ++i) tail += to_float(x[i]);
  const float mean = (lane_sum(acc) + tail) / float(n);
  acc = vec{};
  tail = 0.0f;
  for (int64_t i = 0; i < vn; i += kLanes) {
    const vec d = load(x + i) - mean;
    acc += d * d;
  }
  for (int64_t i = vn; i < n; ++i) tail += (to_float(x[i]) - mean) * (to_float(x[i]) - mean);
  const float rstd = 1.0f / std::sqrt((lane_sum(acc) + tail) / float(n) + a.eps);
  a.mean[pair] = mean;
  a.rstd[pair] = rstd;
  T* y = static_cast<T*>(a.y) + pair * n;
  const int64_t s = a.positions, vs = s / kLanes * kLanes;
  for (int64_t k = 0; k < per_group; ++k) {
    const Channel ch = channel<P, F>(a, b, g * per_group + k);
    // z = (x - mean) mul + add: the mean subtracted first, so a large mean does not cancel away digits
    const float mul = rstd * ch.w * ch.film, add = ch.bias * ch.film + ch.shift;
    const T* xc = x + k * s;
    T* yc = y + k * s;
    for (int64_t i = 0; i < vs; i += kLanes) {
      const vec z = (load(xc + i) - mean) * mul + add;
      store(yc + i, a.silu ? z * sigmoid(z) : z);
    }
    for (int64_t i = vs; i < s; ++i) {
      const float z = (to_float(xc[i]) - mean) * mul + add;
      yc[i] = from_float<T>(a.silu ? z / (1.0f + std::exp(-z)) : z);
    }
  }
}

// dz = dy * act'(z); for SiLU act'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))).
inline vec slope(vec z, bool silu) {
  if (!silu) return splat(1.0f);
  const vec sg = sigmoid(z);
  return sg * (1.0f + z * (1.0f - sg));
}

inline float slope(float z, bool silu) {
  if (!silu) return 1.0f;
  const float sg = 1.0f / (1.0f + std::exp(-z));
  return sg * (1.0f + z * (1.0f - sg));
}

template <typename T, typename P, typename F>
void backward_pair(const GroupNormArgs& a, int64_t pair) {
  const int64_t b = pair / a.groups, g = pair % a.groups, per_group = a.channels / a.groups;
  const int64_t s = a.positions, vs = s / kLanes * kLanes, n = per_group * s;
  const T* x = static_cast<const T*>(a.x) + pair * n;
  const T* dy = static_cast<const T*>(a.dy) + pair * n;
  const float mean = a.mean[pair], rstd = a.rstd[pair];
  float group_dn_w = 0.0f, group_dn_w_xhat = 0.0f;  // sums over the group of dn w and dn w x_hat
  for (int64_t k = 0; k < per_group; ++k) {  // pass 1: the per-channel and per-group sums
    const int64_t c = g * per_group + k;
    const Channel ch = channel<P, F>(a, b, c);
    const T* xc = x + k * s;
    const T* dyc = dy + k * s;
    vec s_dz = {}, s_dz_n = {}, s_dn_xhat = {};
    float t_dz = 0.0f, t_dz_n = 0.0f, t_dn_xhat = 0.0f;
    for (int64_t i = 0; i < vs; i += kLanes) {
      const vec xhat = (load(xc + i) - mean) * rstd, nv = xhat * ch.w + ch.bias;
      const vec dz = load(dyc + i) * slope(nv * ch.film + ch.shift, a.silu);
      s_dz += dz;
      s_dz_n += dz * nv;
      s_dn_xhat += dz * xhat;
    }
    for (int64_t i = vs; i < s; ++i) {
      const float xhat = (to_float(xc[i]) - mean) * rstd, nv = xhat * ch.w + ch.bias;
      const float dz = to_float(dyc[i]) * slope(nv * ch.film + ch.shift, a.silu);
      t_dz += dz;
      t_dz_n += dz * nv;
      t_dn_xhat += dz * xhat;
    }
    const float dz_sum = lane_sum(s_dz) + t_dz, dz_n = lane_sum(s_dz_n) + t_dz_n;
    const float dn_xhat = (lane_sum(s_dn_xhat) + t_dn_xhat) * ch.film, dn = dz_sum * ch.film;  // dn = dz (1 + scale)
    const int64_t bc = b * a.channels + c;
    a.d_shift[bc] = dz_sum;
    a.d_scale[bc] = dz_n;
    a.d_weight[bc] = dn_xhat;
    a.d_bias[bc] = dn;
    group_dn_w += dn * ch.w;
    group_dn_w_xhat += dn_xhat * ch.w;
  }
  const float inv_n = 1.0f / float(n), mean_dn_w = group_dn_w * inv_n, mean_dn_w_xhat = group_dn_w_xhat * inv_n;
  T* dx = static_cast<T*>(a.dx) + pair * n;
  for (int64_t k = 0; k < per_group; ++k) {  // pass 2: dx = rstd (dn w - mean(dn w) - x_hat mean(dn w x_hat))
    const Channel ch = channel<P, F>(a, b, g * per_group + k);
    const float dn_w = ch.film * ch.w;  // dx_hat = dz (1 + scale) w
    const T* xc = x + k * s;
    const T* dyc = dy + k * s;
    T* dxc = dx + k * s;
    for (int64_t i = 0; i < vs; i += kLanes) {
      const vec xhat = (load(xc + i) - mean) * rstd;
      const vec dz = load(dyc + i) * slope((xhat * ch.w + ch.bias) * ch.film + ch.shift, a.silu);
      store(dxc + i, (dz * dn_w - mean_dn_w - xhat * mean_dn_w_xhat) * rstd);
    }
    for (int64_t i = vs; i < s; ++i) {
      const float xhat = (to_float(xc[i]) - mean) * rstd;
      const float dz = to_float(dyc[i]) * slope((xhat * ch.w + ch.bias) * ch.film + ch.shift, a.silu);
      dxc[i] = from_float<T>((dz * dn_w - mean_dn_w - xhat * mean_dn_w_xhat) * rstd);
    }
  }
}

template <typename Fn>
void dispatch3(const GroupNormArgs& a, Fn&& fn) {
  dispatch_dtype(a.x_dtype, [&](auto* xt) {
    dispatch_dtype(a.param_dtype, [&](auto* pt) {
      dispatch_dtype(a.film_dtype, [&](auto* ft) {
        fn(xt, pt, ft);
      });
    });
  });
}

}  // namespace

void group_norm_forward_pairs(const GroupNormArgs& a, int64_t begin, int64_t end) {
  dispatch3(a, [&](auto* xt, auto* pt, auto* ft) {
    using T = std::remove_pointer_t<decltype(xt)>;
    using P = std::remove_pointer_t<decltype(pt)>;
    using F = std::remove_pointer_t<decltype(ft)>;
    for (int64_t pair = begin; pair < end; ++pair) forward_pair<T, P, F>(a, pair);
  });
}

void group_norm_backward_pairs(const GroupNormArgs& a, int64_t begin, int64_t end) {
  dispatch3(a, [&](auto* xt, auto* pt, auto* ft) {
    using T = std::remove_pointer_t<decltype(xt)>;
    using P = std::remove_pointer_t<decltype(pt)>;
    using F = std::remove_pointer_t<decltype(ft)>;
    for (int64_t pair = begin; pair < end; ++pair) backward_pair<T, P, F>(a, pair);
  });
}

}  // namespace fastforget
