#include "group_norm.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "scalar.h"
#include "vec_io.h"

namespace fastforget {
namespace {

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

// -- channels last: an image per task, each position a run of its channels -------------------

// One step over channels [c, c + width of V): a vector of kLanes channels, or one (the tail).
template <typename Fn>
inline void channel_steps(int64_t channels, Fn&& fn) {
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) fn(c, vec{});
  for (; c < channels; ++c) fn(c, 0.0f);
}

template <typename T> inline float get(const T* p, float) { return to_float(*p); }
template <typename T> inline vec get(const T* p, vec) { return load(p); }
template <typename T> inline void put(T* p, float v) { *p = from_float<T>(v); }
template <typename T> inline void put(T* p, vec v) { store(p, v); }
inline float act(float z, bool silu) { return silu ? z / (1.0f + std::exp(-z)) : z; }
inline vec act(vec z, bool silu) { return silu ? z * sigmoid(z) : z; }

constexpr int64_t kPositionBlock = 64;  // per-channel sums add a block's partial at a time: error ~ (64 + S/64) ulp

// Per-channel sums over the image's positions of f(c, x at (p, c)), into out (channels floats).
template <typename T, typename F>
void channel_sums(const T* x, int64_t positions, int64_t channels, float* out, float* partial, F&& f) {
  std::fill(out, out + channels, 0.0f);
  for (int64_t p0 = 0; p0 < positions; p0 += kPositionBlock) {
    std::fill(partial, partial + channels, 0.0f);
    for (int64_t p = p0; p < std::min(p0 + kPositionBlock, positions); ++p)
      channel_steps(channels, [&](int64_t c, auto v) { put(partial + c, get(partial + c, v) + f(c, get(x + p * channels + c, v))); });
    channel_steps(channels, [&](int64_t c, auto v) { put(out + c, get(out + c, v) + get(partial + c, v)); });
  }
}

// The group's total of per-channel values, in channel order, spread back to each channel.
void group_totals(const float* per_channel, int64_t channels, int64_t groups, float scale, float* out) {
  const int64_t per_group = channels / groups;
  for (int64_t g = 0; g < groups; ++g) {
    float t = 0.0f;
    for (int64_t k = 0; k < per_group; ++k) t += per_channel[g * per_group + k];
    std::fill(out + g * per_group, out + (g + 1) * per_group, t * scale);
  }
}

template <typename T, typename P, typename F>
void forward_image_nhwc(const GroupNormArgs& a, int64_t b) {
  const int64_t C = a.channels, S = a.positions, G = a.groups, per_group = C / G;
  const T* x = static_cast<const T*>(a.x) + b * S * C;
  T* y = static_cast<T*>(a.y) + b * S * C;
  std::vector<float> buf(6 * C);
  float *sums = buf.data(), *partial = sums + C, *mean = partial + C, *rstd = mean + C, *mul = rstd + C,
        *add = mul + C;
  const float inv_n = 1.0f / float(per_group * S);
  channel_sums(x, S, C, sums, partial, [](int64_t, auto v) { return v; });
  group_totals(sums, C, G, inv_n, mean);
  channel_sums(x, S, C, sums, partial, [&](int64_t c, auto v) {
    const auto d = v - get(mean + c, v);
    return d * d;
  });
  group_totals(sums, C, G, inv_n, rstd);
  for (int64_t c = 0; c < C; ++c) {
    rstd[c] = 1.0f / std::sqrt(rstd[c] + a.eps);
    const Channel ch = channel<P, F>(a, b, c);
    mul[c] = rstd[c] * ch.w * ch.film;
    add[c] = ch.bias * ch.film + ch.shift;
  }
  for (int64_t g = 0; g < G; ++g) {
    a.mean[b * G + g] = mean[g * per_group];
    a.rstd[b * G + g] = rstd[g * per_group];
  }
  for (int64_t p = 0; p < S; ++p)
    channel_steps(C, [&](int64_t c, auto v) {
      const auto z = (get(x + p * C + c, v) - get(mean + c, v)) * get(mul + c, v) + get(add + c, v);
      put(y + p * C + c, act(z, a.silu));
    });
}

template <typename T, typename P, typename F>
void backward_image_nhwc(const GroupNormArgs& a, int64_t b) {
  const int64_t C = a.channels, S = a.positions, G = a.groups, per_group = C / G;
  const T* x = static_cast<const T*>(a.x) + b * S * C;
  const T* dy = static_cast<const T*>(a.dy) + b * S * C;
  T* dx = static_cast<T*>(a.dx) + b * S * C;
  std::vector<float> buf(14 * C);
  float *mean = buf.data(), *rstd = mean + C, *w = rstd + C, *bias = w + C, *film = bias + C, *shift = film + C;
  float *s_dz = shift + C, *s_dz_n = s_dz + C, *s_dz_xhat = s_dz_n + C, *partial = s_dz_xhat + C;
  float *dn_w = partial + C, *dn_w_xhat = dn_w + C, *mean_dn_w = dn_w_xhat + C, *mean_dn_w_xhat = mean_dn_w + C;
  for (int64_t c = 0; c < C; ++c) {
    const Channel ch = channel<P, F>(a, b, c);
    mean[c] = a.mean[b * G + c / per_group];
    rstd[c] = a.rstd[b * G + c / per_group];
    w[c] = ch.w, bias[c] = ch.bias, film[c] = ch.film, shift[c] = ch.shift;
  }
  auto dz_at = [&](int64_t p, int64_t c, auto v, auto& xhat, auto& nv) {
    xhat = (get(x + p * C + c, v) - get(mean + c, v)) * get(rstd + c, v);
    nv = xhat * get(w + c, v) + get(bias + c, v);
    return get(dy + p * C + c, v) * slope(nv * get(film + c, v) + get(shift + c, v), a.silu);
  };
  // pass 1: the three per-channel sums, each blocked as channel_sums
  for (float* t : {s_dz, s_dz_n, s_dz_xhat}) std::fill(t, t + C, 0.0f);
  std::vector<float> partials(3 * C);
  for (int64_t p0 = 0; p0 < S; p0 += kPositionBlock) {
    std::fill(partials.begin(), partials.end(), 0.0f);
    float *p_dz = partials.data(), *p_dz_n = p_dz + C, *p_dz_xhat = p_dz_n + C;
    for (int64_t p = p0; p < std::min(p0 + kPositionBlock, S); ++p)
      channel_steps(C, [&](int64_t c, auto v) {
        decltype(v) xhat, nv;
        const auto dz = dz_at(p, c, v, xhat, nv);
        put(p_dz + c, get(p_dz + c, v) + dz);
        put(p_dz_n + c, get(p_dz_n + c, v) + dz * nv);
        put(p_dz_xhat + c, get(p_dz_xhat + c, v) + dz * xhat);
      });
    for (int64_t c = 0; c < C; ++c) {
      s_dz[c] += p_dz[c];
      s_dz_n[c] += p_dz_n[c];
      s_dz_xhat[c] += p_dz_xhat[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t bc = b * C + c;
    const float dn_xhat = s_dz_xhat[c] * film[c], dn = s_dz[c] * film[c];  // dn = dz (1 + scale)
    a.d_shift[bc] = s_dz[c];
    a.d_scale[bc] = s_dz_n[c];
    a.d_weight[bc] = dn_xhat;
    a.d_bias[bc] = dn;
    dn_w[c] = dn * w[c];
    dn_w_xhat[c] = dn_xhat * w[c];
  }
  const float inv_n = 1.0f / float(per_group * S);
  group_totals(dn_w, C, G, inv_n, mean_dn_w);
  group_totals(dn_w_xhat, C, G, inv_n, mean_dn_w_xhat);
  for (int64_t c = 0; c < C; ++c) partial[c] = film[c] * w[c];  // dx_hat = dz (1 + scale) w
  for (int64_t p = 0; p < S; ++p)  // pass 2: dx = rstd (dn w - mean(dn w) - x_hat mean(dn w x_hat))
    channel_steps(C, [&](int64_t c, auto v) {
      decltype(v) xhat, nv;
      const auto dz = dz_at(p, c, v, xhat, nv);
      put(dx + p * C + c, (dz * get(partial + c, v) - get(mean_dn_w + c, v) - xhat * get(mean_dn_w_xhat + c, v)) *
                              get(rstd + c, v));
    });
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

void group_norm_forward_tasks(const GroupNormArgs& a, int64_t begin, int64_t end) {
  dispatch3(a, [&](auto* xt, auto* pt, auto* ft) {
    using T = std::remove_pointer_t<decltype(xt)>;
    using P = std::remove_pointer_t<decltype(pt)>;
    using F = std::remove_pointer_t<decltype(ft)>;
    for (int64_t task = begin; task < end; ++task)
      a.channels_last ? forward_image_nhwc<T, P, F>(a, task) : forward_pair<T, P, F>(a, task);
  });
}

void group_norm_backward_tasks(const GroupNormArgs& a, int64_t begin, int64_t end) {
  dispatch3(a, [&](auto* xt, auto* pt, auto* ft) {
    using T = std::remove_pointer_t<decltype(xt)>;
    using P = std::remove_pointer_t<decltype(pt)>;
    using F = std::remove_pointer_t<decltype(ft)>;
    for (int64_t task = begin; task < end; ++task)
      a.channels_last ? backward_image_nhwc<T, P, F>(a, task) : backward_pair<T, P, F>(a, task);
  });
}

}  // namespace fastforget
