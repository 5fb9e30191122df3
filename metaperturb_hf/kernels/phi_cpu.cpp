// φ of MetaPerturb fused into one forward and one backward kernel for CPU (float32 and float64).
//
// Every map is processed in channels-last (B, H, W, C), one image at a time (images in parallel): the image's
// intermediate planes (hidden layer, noise gradients, ...) live in per-thread scratch that stays in cache, so the
// full-size tensors that pass through memory are only the input, the output, the incoming gradient, the input
// gradient and (unless recomputed) the noise's argument. Noise comes from Philox4x32-10 keyed by a seed and the
// element's index (b, i, j, c) in channels-last order, so the backward regenerates it instead of storing it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kTaps = 9;
constexpr int kFilters = 4;

// Philox4x32-10 (Salmon et al., 2011): 4 random 32-bit words from a 128-bit counter and a 64-bit key.
inline void philox(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// Standard normals for the elements [start, start + n) of the stream `seed`: element e is lane e % 4 of counter
// e / 4, two Box–Muller pairs per counter. Uniforms use the top 24 bits, in (0, 1).
template <typename T>
void fill_normals(uint64_t seed, int64_t start, int64_t n, T* out, uint32_t* words) {
  const int64_t first = start >> 2, last = (start + n - 1) >> 2, groups = last - first + 1;
  for (int64_t g = 0; g < groups; ++g) philox(uint64_t(first + g), seed, words + 4 * g);
  const T scale = T(1.0 / 16777216.0), two_pi = T(6.283185307179586);
  const int64_t offset = start - 4 * first;
  for (int64_t e = 0; e < n; ++e) {
    const int64_t lane = offset + e, pair = lane & ~int64_t(1);
    const T u1 = (T(words[pair] >> 8) + T(0.5)) * scale, u2 = (T(words[pair + 1] >> 8) + T(0.5)) * scale;
    const T radius = std::sqrt(T(-2) * std::log(u1)), angle = two_pi * u2;
    out[e] = (lane & 1) ? radius * std::sin(angle) : radius * std::cos(angle);
  }
}

template <typename T>
inline T softplus(T x) {  // F.softplus with beta 1, threshold 20
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// The 9 neighbours of every position of an (H, W, C) plane (zero padding: `zeros` stands for outside), passed to
// `body(p, neighbours)` position by position.
template <typename T, typename Body>
inline void for_each_position(const T* plane, const T* zeros, int64_t H, int64_t W, int64_t C, Body body) {
  const T* nb[kTaps];
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j) {
      for (int di = -1; di <= 1; ++di)
        for (int dj = -1; dj <= 1; ++dj) {
          const int64_t ii = i + di, jj = j + dj;
          const bool inside = ii >= 0 && ii < H && jj >= 0 && jj < W;
          nb[(di + 1) * 3 + dj + 1] = inside ? plane + (ii * W + jj) * C : zeros;
        }
      body(i * W + j, nb);
    }
}

// out = k ⋆ plane (cross-correlation, zero padding) for an (H, W, C) plane; `add` accumulates instead.
template <typename T>
void stencil(const T* plane, const T* zeros, const T* k, T* out, int64_t H, int64_t W, int64_t C, bool add) {
  for_each_position(plane, zeros, H, W, C, [&](int64_t p, const T* const* nb) {
    T* o = out + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      T acc = add ? o[c] : T(0);
      for (int t = 0; t < kTaps; ++t) acc += k[t] * nb[t][c];
      o[c] = acc;
    }
  });
}

// grad_k[t] += Σ_p,c grad[p, c] · plane[p + offset_t, c]: the gradient of a kernel shared by all channels.
template <typename T>
void kernel_grad(const T* grad, const T* plane, const T* zeros, double* grad_k, int64_t H, int64_t W, int64_t C) {
  for_each_position(plane, zeros, H, W, C, [&](int64_t p, const T* const* nb) {
    const T* g = grad + p * C;
    for (int t = 0; t < kTaps; ++t) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < C; ++c) acc += g[c] * nb[t][c];
      grad_k[t] += acc;
    }
  });
}

template <typename T>
void flip(const T* k, T* flipped) {
  for (int t = 0; t < kTaps; ++t) flipped[t] = k[kTaps - 1 - t];
}

template <typename T>
void channel_mean(const T* plane, T* mean, int64_t HW, int64_t C) {
  for (int64_t p = 0; p < HW; ++p) {
    T acc = 0;
    for (int64_t c = 0; c < C; ++c) acc += plane[p * C + c];
    mean[p] = acc / T(C);
  }
}

inline bool finite_bits(float v) { uint32_t u; std::memcpy(&u, &v, 4); return (u & 0x7f800000u) != 0x7f800000u; }
inline bool finite_bits(double v) {
  uint64_t u; std::memcpy(&u, &v, 8); return (u & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// Everything about one call that is not a full-size tensor.
template <typename T>
struct Params {
  int64_t B, C, H, W;
  T lam[2][kTaps], gam[2][kTaps], stat[kFilters][kTaps];
  T kappa;
  bool clip;
  T clip_value;
  bool drawn;  // noise from Philox (else from `noise`)
  uint64_t seed;
};

template <typename T>
Params<T> read_params(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& gam, const at::Tensor& stat,
                      double kappa, c10::optional<double> clip, const c10::optional<at::Tensor>& noise,
                      const c10::optional<at::Tensor>& seed) {
  Params<T> P;
  P.B = x.size(0); P.C = x.size(1); P.H = x.size(2); P.W = x.size(3);
  auto l = lam.contiguous(), g = gam.contiguous(), s = stat.contiguous();
  for (int t = 0; t < kTaps; ++t) {
    for (int q = 0; q < 2; ++q) {
      P.lam[q][t] = l.data_ptr<T>()[q * kTaps + t];
      P.gam[q][t] = g.data_ptr<T>()[q * kTaps + t];
    }
    for (int q = 0; q < kFilters; ++q) P.stat[q][t] = s.data_ptr<T>()[q * kTaps + t];
  }
  P.kappa = T(kappa);
  P.clip = clip.has_value();
  P.clip_value = T(clip.value_or(0.0));
  P.drawn = !noise.has_value();
  TORCH_CHECK(!P.drawn || seed.has_value(), "phi_cpu: neither noise nor a seed was given");
  P.seed = P.drawn ? uint64_t(seed->item<int64_t>()) : 0;
  return P;
}

// Per-thread scratch for one image: planes of H·W·C and of H·W.
template <typename T>
struct Scratch {
  std::vector<T> zeros, planes, small;
  std::vector<uint32_t> words;
  int64_t size, hw;
  Scratch(int64_t HW, int64_t C, int num_planes, int num_small)
      : zeros(C, T(0)), planes(size_t(HW * C * num_planes)), small(size_t(HW * num_small)),
        words(size_t(C + 8)), size(HW * C), hw(HW) {}
  T* plane(int q) { return planes.data() + q * size; }
  T* mean(int q) { return small.data() + q * hw; }
};

// hidden = ReLU(λ₁ ⋆ x + γ₁ ⋆ mean_c x) of one image into `hidden`; `m1`, `m2` get the channel means of x and of
// the hidden layer, `g1` the plane γ₁ ⋆ m1.
template <typename T>
void hidden_layer(const Params<T>& P, const T* x, Scratch<T>& s, T* hidden, T* m1, T* g1, T* m2) {
  const int64_t H = P.H, W = P.W, C = P.C, HW = H * W;
  channel_mean(x, m1, HW, C);
  for (int64_t p = 0; p < HW; ++p)
    TORCH_CHECK_VALUE(finite_bits(m1[p]), "hidden_states contains NaN or Inf; the features reaching this site are already "
                "broken (check the input data and the layers before it).");
  stencil(m1, s.zeros.data(), P.gam[0], g1, H, W, int64_t(1), false);
  for_each_position(x, s.zeros.data(), H, W, C, [&](int64_t p, const T* const* nb) {
    T* o = hidden + p * C;
    const T shared = g1[p];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      T acc = shared;
      for (int t = 0; t < kTaps; ++t) acc += P.lam[0][t] * nb[t][c];
      o[c] = acc > T(0) ? acc : T(0);
    }
  });
  channel_mean(hidden, m2, HW, C);
}

// The noise's argument μ + ε of image b into `argument`, given its hidden layer (λ₂ ⋆ hidden + γ₂ ⋆ m2 + ε).
template <typename T>
void noise_argument(const Params<T>& P, int64_t b, const T* hidden, const T* m2, const T* noise, Scratch<T>& s,
                    T* g2, T* argument) {
  const int64_t H = P.H, W = P.W, C = P.C, HW = H * W;
  stencil(m2, s.zeros.data(), P.gam[1], g2, H, W, int64_t(1), false);
  for_each_position(hidden, s.zeros.data(), H, W, C, [&](int64_t p, const T* const* nb) {
    T* o = argument + p * C;
    if (P.drawn) {
      fill_normals(P.seed, (b * HW + p) * C, C, o, s.words.data());
    } else {
      std::memcpy(o, noise + (b * HW + p) * C, sizeof(T) * C);
    }
    const T shared = g2[p];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      T acc = shared;
      for (int t = 0; t < kTaps; ++t) acc += P.lam[1][t] * nb[t][c];
      o[c] += acc;
    }
  });
}

template <typename T>
void write_map(const T* plane, int64_t b, const at::Tensor& out, const Params<T>& P) {
  // Writes an image in channels-last order into `out`, whatever its strides.
  T* base = out.data_ptr<T>();
  const int64_t sb = out.stride(0), sc = out.stride(1), sh = out.stride(2), sw = out.stride(3);
  for (int64_t i = 0; i < P.H; ++i)
    for (int64_t j = 0; j < P.W; ++j) {
      T* o = base + b * sb + i * sh + j * sw;
      const T* in = plane + (i * P.W + j) * P.C;
      if (sc == 1) {
        std::memcpy(o, in, sizeof(T) * P.C);
      } else {
        for (int64_t c = 0; c < P.C; ++c) o[c * sc] = in[c];
      }
    }
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& h, const at::Tensor& lam, const at::Tensor& gam,
                                     const at::Tensor& stat, const at::Tensor& weight, const at::Tensor& running_mean,
                                     const at::Tensor& running_var, const c10::optional<at::Tensor>& noise,
                                     const c10::optional<at::Tensor>& seed, double kappa, c10::optional<double> clip,
                                     double channel_descriptor, double spatial_descriptor, bool training,
                                     bool save_argument) {
  const auto x = h.contiguous(at::MemoryFormat::ChannelsLast);
  const auto P = read_params<T>(x, lam, gam, stat, kappa, clip, noise, seed);
  const int64_t B = P.B, C = P.C, H = P.H, W = P.W, HW = H * W;
  const T* X = x.data_ptr<T>();
  at::Tensor noise_cl;
  if (!P.drawn) noise_cl = noise->to(x.dtype()).contiguous(at::MemoryFormat::ChannelsLast);
  const T* E = P.drawn ? nullptr : noise_cl.data_ptr<T>();
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  const int threads = at::get_num_threads();

  // 1. Pooled responses u[b, c, k] = mean_HW ReLU(K_k ⋆ x) (training only: evaluation uses the running statistics).
  auto pooled = training ? at::empty({B, C, kFilters}, options) : at::empty({0}, options);
  if (training) {
    T* U = pooled.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> zeros(C, T(0)), sums(kFilters * C);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(sums.begin(), sums.end(), T(0));
        for_each_position(X + b * HW * C, zeros.data(), H, W, C, [&](int64_t, const T* const* nb) {
          for (int q = 0; q < kFilters; ++q) {
            T* sq = sums.data() + q * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              T acc = 0;
              for (int t = 0; t < kTaps; ++t) acc += P.stat[q][t] * nb[t][c];
              sq[c] += acc > T(0) ? acc : T(0);
            }
          }
        });
        for (int64_t c = 0; c < C; ++c)
          for (int q = 0; q < kFilters; ++q) U[(b * C + c) * kFilters + q] = sums[q * C + c] / T(HW);
      }
    });
  }

  // 2. Features [mean (4), var (4), C / C_norm, H / H_norm] per channel and the channel scale s.
  const int64_t F = 2 * kFilters + 2;
  auto features = at::empty({C, F}, options);
  auto scale = at::empty({C}, options);
  {
    T* Fe = features.data_ptr<T>();
    const auto rm = running_mean.contiguous(), rv = running_var.contiguous();
    const T* U = training ? pooled.data_ptr<T>() : nullptr;
    for (int64_t c = 0; c < C; ++c)
      for (int q = 0; q < kFilters; ++q) {
        T mean, var;
        if (training) {
          double sum = 0;
          for (int64_t b = 0; b < B; ++b) sum += U[(b * C + c) * kFilters + q];
          const double m = sum / double(B);
          double squares = 0;
          for (int64_t b = 0; b < B; ++b) {
            const double d = U[(b * C + c) * kFilters + q] - m;
            squares += d * d;
          }
          mean = T(m);
          var = B > 1 ? T(squares / double(B - 1)) : T(0);
        } else {
          mean = rm.data_ptr<T>()[c * kFilters + q];
          var = rv.data_ptr<T>()[c * kFilters + q];
        }
        Fe[c * F + q] = mean;
        Fe[c * F + kFilters + q] = var;
      }
    const auto w = weight.contiguous();
    const T* Wt = w.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      Fe[c * F + 2 * kFilters] = T(channel_descriptor);
      Fe[c * F + 2 * kFilters + 1] = T(spatial_descriptor);
      T logit = 0;
      for (int64_t f = 0; f < F; ++f) logit += Fe[c * F + f] * Wt[f];
      scale.data_ptr<T>()[c] = sigmoid(logit);
    }
  }

  // 3. Per image: hidden layer, μ + ε, z = softplus, the output (and the argument, when saved).
  auto output = at::empty_like(h);
  auto argument = save_argument ? at::empty_like(x) : at::empty({0}, options);
  std::vector<double> noise_sums(threads, 0.0);
  const T* S = scale.data_ptr<T>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(HW, C, 3, 4);
    T *hidden = s.plane(0), *arg = s.plane(1), *out = s.plane(2);
    double z_sum = 0;
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = X + b * HW * C;
      hidden_layer(P, xb, s, hidden, s.mean(0), s.mean(1), s.mean(2));
      T* arg_b = save_argument ? argument.data_ptr<T>() + b * HW * C : arg;
      noise_argument(P, b, hidden, s.mean(2), E, s, s.mean(3), arg_b);
      for (int64_t p = 0; p < HW; ++p) {
        const T* a = arg_b + p * C;
        const T* xp = xb + p * C;
        T* o = out + p * C;
        T zs = 0;
#pragma omp simd reduction(+ : zs)
        for (int64_t c = 0; c < C; ++c) {
          const T z = softplus(a[c]);
          zs += z;
          T v = xp[c] * ((T(1) - P.kappa) + P.kappa * S[c] * z);
          if (P.clip) v = v > P.clip_value ? P.clip_value : v;
          o[c] = v;
        }
        z_sum += zs;
      }
      write_map(out, b, output, P);
    }
    noise_sums[at::get_thread_num()] += z_sum;
  });
  double total = 0;
  for (double v : noise_sums) total += v;
  auto noise_mean = at::full({}, total / double(B * C * HW), options);
  return {output, scale, noise_mean, pooled, features, argument};
}

// Backward. Phase 1 per image: recompute the hidden layer (and μ + ε unless saved), the gradient through the noise
// path and the direct path, and the partial gradient of s. Then s's gradient over the whole batch gives the
// gradient of the pooled statistics, and phase 2 per image adds the statistics filters' path (training only).
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_output, const at::Tensor& h, const at::Tensor& lam,
                                      const at::Tensor& gam, const at::Tensor& stat, const at::Tensor& weight,
                                      const at::Tensor& pooled, const at::Tensor& features, const at::Tensor& scale,
                                      const at::Tensor& saved_argument, const c10::optional<at::Tensor>& noise,
                                      const c10::optional<at::Tensor>& seed, double kappa, c10::optional<double> clip,
                                      bool training, bool needs_input, bool needs_params) {
  const auto x = h.contiguous(at::MemoryFormat::ChannelsLast);
  const auto go = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const auto P = read_params<T>(x, lam, gam, stat, kappa, clip, noise, seed);
  const int64_t B = P.B, C = P.C, H = P.H, W = P.W, HW = H * W;
  const int64_t F = 2 * kFilters + 2;
  const T* X = x.data_ptr<T>();
  const T* G = go.data_ptr<T>();
  const bool has_argument = saved_argument.numel() > 0;
  at::Tensor noise_cl;
  if (!P.drawn && !has_argument) noise_cl = noise->to(x.dtype()).contiguous(at::MemoryFormat::ChannelsLast);
  const T* E = noise_cl.defined() ? noise_cl.data_ptr<T>() : nullptr;
  const T* S = scale.data_ptr<T>();
  const int threads = at::get_num_threads();
  // The channels-last input gradient; written only when wanted, but phase 2 reads it.
  auto grad_x_cl = at::empty_like(x);
  T* GX = grad_x_cl.data_ptr<T>();
  // Per-thread accumulators: s's gradient per channel, then λ₁, λ₂, γ₁, γ₂ (9 each).
  std::vector<std::vector<double>> grad_scale_parts(threads, std::vector<double>(C, 0.0));
  std::vector<std::vector<double>> kernel_parts(threads, std::vector<double>(4 * kTaps, 0.0));
  T flipped_lam[2][kTaps], flipped_gam[2][kTaps], flipped_stat[kFilters][kTaps];
  for (int q = 0; q < 2; ++q) { flip(P.lam[q], flipped_lam[q]); flip(P.gam[q], flipped_gam[q]); }
  for (int q = 0; q < kFilters; ++q) flip(P.stat[q], flipped_stat[q]);
  const T inv_c = T(1) / T(C);

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(HW, C, 4, 8);
    T *hidden = s.plane(0), *arg = s.plane(1), *grad_mu = s.plane(2), *grad_hidden = s.plane(3);
    T *m1 = s.mean(0), *g1 = s.mean(1), *m2 = s.mean(2), *g2 = s.mean(3);
    T *sum_mu = s.mean(4), *sum_hidden = s.mean(5), *shared = s.mean(6);
    double* grad_scale = grad_scale_parts[at::get_thread_num()].data();
    double* grad_k = kernel_parts[at::get_thread_num()].data();
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = X + b * HW * C;
      const T* gb = G + b * HW * C;
      T* gxb = GX + b * HW * C;
      hidden_layer(P, xb, s, hidden, m1, g1, m2);
      const T* a = arg;
      if (has_argument) {
        a = saved_argument.data_ptr<T>() + b * HW * C;
      } else {
        noise_argument(P, b, hidden, m2, E, s, g2, arg);
      }
      // Through z and the direct path: grad_x = g · multiplier, grad_mu = g · x · κ s σ(μ + ε).
      for (int64_t p = 0; p < HW; ++p) {
        const T *ap = a + p * C, *xp = xb + p * C, *gp = gb + p * C;
        T *gx = gxb + p * C, *gm = grad_mu + p * C;
        T total = 0;
        for (int64_t c = 0; c < C; ++c) {
          const T z = softplus(ap[c]);
          const T multiplier = (T(1) - P.kappa) + P.kappa * S[c] * z;
          T g = gp[c];
          if (P.clip && xp[c] * multiplier > P.clip_value) g = T(0);
          const T gxz = g * xp[c];
          grad_scale[c] += double(gxz * z);
          gx[c] = g * multiplier;
          gm[c] = gxz * P.kappa * S[c] * sigmoid(ap[c]);
          total += gm[c];
        }
        sum_mu[p] = total;
      }
      // μ = λ₂ ⋆ hidden + γ₂ ⋆ m2: grad_hidden = (λ₂ᵀ ⋆ grad_mu + γ₂ᵀ ⋆ Σ_c grad_mu / C) · [hidden > 0].
      stencil(sum_mu, s.zeros.data(), flipped_gam[1], shared, H, W, int64_t(1), false);
      for_each_position(grad_mu, s.zeros.data(), H, W, C, [&](int64_t p, const T* const* nb) {
        T* o = grad_hidden + p * C;
        const T* hp = hidden + p * C;
        const T common = shared[p] * inv_c;
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t c = 0; c < C; ++c) {
          T acc = common;
          for (int t = 0; t < kTaps; ++t) acc += flipped_lam[1][t] * nb[t][c];
          acc = hp[c] > T(0) ? acc : T(0);
          o[c] = acc;
          total += acc;
        }
        sum_hidden[p] = total;
      });
      // hidden = ReLU(λ₁ ⋆ x + γ₁ ⋆ m1): grad_x += λ₁ᵀ ⋆ grad_hidden + γ₁ᵀ ⋆ Σ_c grad_hidden / C.
      stencil(sum_hidden, s.zeros.data(), flipped_gam[0], shared, H, W, int64_t(1), false);
      for_each_position(grad_hidden, s.zeros.data(), H, W, C, [&](int64_t p, const T* const* nb) {
        T* o = gxb + p * C;
        const T common = shared[p] * inv_c;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          T acc = o[c] + common;
          for (int t = 0; t < kTaps; ++t) acc += flipped_lam[0][t] * nb[t][c];
          o[c] = acc;
        }
      });
      if (needs_params) {
        kernel_grad(grad_hidden, xb, s.zeros.data(), grad_k, H, W, C);             // λ₁
        kernel_grad(grad_mu, hidden, s.zeros.data(), grad_k + kTaps, H, W, C);     // λ₂
        kernel_grad(sum_hidden, m1, s.zeros.data(), grad_k + 2 * kTaps, H, W, int64_t(1));  // γ₁ (mean over C)
        kernel_grad(sum_mu, m2, s.zeros.data(), grad_k + 3 * kTaps, H, W, int64_t(1));      // γ₂
      }
    }
  });

  // s = sigmoid(features · w): the gradients of w and of the batch statistics.
  const auto wc = weight.contiguous();
  const T* Wt = wc.data_ptr<T>();
  const T* Fe = features.data_ptr<T>();
  std::vector<double> grad_logit(C), grad_w(F, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    double g = 0;
    for (int th = 0; th < threads; ++th) g += grad_scale_parts[th][c];
    const double sc = S[c];
    grad_logit[c] = g * double(P.kappa) * sc * (1.0 - sc);
    for (int64_t f = 0; f < F; ++f) grad_w[f] += double(Fe[c * F + f]) * grad_logit[c];
  }
  std::vector<std::vector<double>> stat_parts(threads, std::vector<double>(kFilters * kTaps, 0.0));
  if (training) {
    // grad_pooled[b, c, k] = (∂/∂mean / B + ∂/∂var · 2 (u − mean) / (B − 1)) / HW, the per-map scale of the gradient
    // that reaches ReLU(K_k ⋆ x) at every position.
    auto grad_pooled = at::empty({B, C, kFilters}, pooled.options());
    T* GP = grad_pooled.data_ptr<T>();
    const T* U = pooled.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c)
      for (int q = 0; q < kFilters; ++q) {
        const double gmean = grad_logit[c] * Wt[q], gvar = grad_logit[c] * Wt[kFilters + q];
        const double mean = Fe[c * F + q];
        for (int64_t b = 0; b < B; ++b) {
          double g = gmean / double(B);
          if (B > 1) g += gvar * 2.0 * (U[(b * C + c) * kFilters + q] - mean) / double(B - 1);
          GP[(b * C + c) * kFilters + q] = T(g / double(HW));
        }
      }
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> s(HW, C, kFilters, 0);
      double* grad_k = stat_parts[at::get_thread_num()].data();
      for (int64_t b = begin; b < end; ++b) {
        const T* xb = X + b * HW * C;
        T* gxb = GX + b * HW * C;
        const T* gp = GP + b * C * kFilters;
        // a_k = [K_k ⋆ x > 0] · grad_pooled[b, :, k]
        for_each_position(xb, s.zeros.data(), H, W, C, [&](int64_t p, const T* const* nb) {
          for (int q = 0; q < kFilters; ++q) {
            T* o = s.plane(q) + p * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              T acc = 0;
              for (int t = 0; t < kTaps; ++t) acc += P.stat[q][t] * nb[t][c];
              o[c] = acc > T(0) ? gp[c * kFilters + q] : T(0);
            }
          }
        });
        for (int q = 0; q < kFilters; ++q) {
          if (needs_input) stencil(s.plane(q), s.zeros.data(), flipped_stat[q], gxb, H, W, C, true);
          if (needs_params) kernel_grad(s.plane(q), xb, s.zeros.data(), grad_k + q * kTaps, H, W, C);
        }
      }
    });
  }

  at::Tensor grad_x, grad_lam, grad_gam, grad_stat, grad_weight;
  if (needs_input) {
    grad_x = at::empty_like(h);
    if (grad_x.strides() == grad_x_cl.strides()) {
      grad_x = grad_x_cl;
    } else {
      grad_x.copy_(grad_x_cl);
    }
  }
  if (needs_params) {
    auto total = [&](const std::vector<std::vector<double>>& parts, int64_t offset, int64_t n) {
      auto out = at::zeros({n}, at::TensorOptions().dtype(at::kDouble));
      double* o = out.data_ptr<double>();
      for (const auto& part : parts)
        for (int64_t i = 0; i < n; ++i) o[i] += part[offset + i];
      return out.to(x.scalar_type());
    };
    grad_lam = at::cat({total(kernel_parts, 0, kTaps), total(kernel_parts, kTaps, kTaps)}).view(lam.sizes());
    grad_gam = at::cat({total(kernel_parts, 2 * kTaps, kTaps), total(kernel_parts, 3 * kTaps, kTaps)})
                   .view(gam.sizes());
    grad_stat = total(stat_parts, 0, kFilters * kTaps).view(stat.sizes());
    grad_weight = at::from_blob(grad_w.data(), {F}, at::TensorOptions().dtype(at::kDouble)).to(x.scalar_type(), false, true);
  }
  return {grad_x, grad_lam, grad_gam, grad_stat, grad_weight};
}

void check(const at::Tensor& h, const at::Tensor& stat) {
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 4, "phi_cpu: a (B, C, H, W) CPU tensor is needed");
  TORCH_CHECK(stat.size(0) == kFilters && stat.size(-1) == 3 && stat.size(-2) == 3,
              "phi_cpu: four 3×3 statistics filters are needed");
}

std::vector<at::Tensor> forward(const at::Tensor& h, const at::Tensor& lam, const at::Tensor& gam,
                                const at::Tensor& stat, const at::Tensor& weight, const at::Tensor& running_mean,
                                const at::Tensor& running_var, const c10::optional<at::Tensor>& noise,
                                const c10::optional<at::Tensor>& seed, double kappa, c10::optional<double> clip,
                                double channel_descriptor, double spatial_descriptor, bool training,
                                bool save_argument) {
  check(h, stat);
  return AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "phi_cpu_forward", [&] {
    return forward_impl<scalar_t>(h, lam, gam, stat, weight, running_mean, running_var, noise, seed, kappa, clip,
                                  channel_descriptor, spatial_descriptor, training, save_argument);
  });
}

std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& h, const at::Tensor& lam,
                                 const at::Tensor& gam, const at::Tensor& stat, const at::Tensor& weight,
                                 const at::Tensor& pooled, const at::Tensor& features, const at::Tensor& scale,
                                 const at::Tensor& saved_argument, const c10::optional<at::Tensor>& noise,
                                 const c10::optional<at::Tensor>& seed, double kappa, c10::optional<double> clip,
                                 bool training, bool needs_input, bool needs_params) {
  check(h, stat);
  return AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "phi_cpu_backward", [&] {
    return backward_impl<scalar_t>(grad_output, h, lam, gam, stat, weight, pooled, features, scale, saved_argument,
                                   noise, seed, kappa, clip, training, needs_input, needs_params);
  });
}

// The standard normals that a call with `seed` draws, as a (B, C, H, W) channels-last tensor: the noise of the
// fused path, for a backward that is differentiated again (it runs the eager math on the same ε).
at::Tensor normals(const at::Tensor& like, const at::Tensor& seed) {
  auto out = at::empty_like(like, like.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint64_t key = uint64_t(seed.item<int64_t>());
  const int64_t B = like.size(0), C = like.size(1), HW = like.size(2) * like.size(3);
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "phi_cpu_normals", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * HW, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> words(size_t(C + 8));
      for (int64_t p = begin; p < end; ++p) fill_normals(key, p * C, C, o + p * C, words.data());
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("normals", &normals);
}
