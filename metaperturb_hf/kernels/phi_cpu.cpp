// φ of MetaPerturb fused into one forward and one backward kernel for CPU (float32 and float64).
//
// Every map is processed in channels-last (B, H, W, C), one image at a time (images in parallel). An image's
// intermediate planes (its copy of the input, the hidden layer, the noise, the gradients of μ and of the hidden
// layer) live in per-thread scratch with a zero border, which stays in cache, so the full-size tensors that pass
// through memory are only the input, the output, the incoming gradient and the input gradient: the backward
// recomputes everything else from the input (measured: faster than saving the noise's argument, and it saves only
// the input, as activation checkpointing would). With the zero border a 3×3 stencil over a row of the image is nine shifted, contiguous
// streams of W·C values: one vectorised loop without bounds checks. Noise comes from Philox4x32-10 keyed by a seed
// and the element's index ((b·H + i)·W + j)·C + c, so the backward regenerates it instead of storing it. In the
// expected-noise mode (the deterministic single pass) z is E_ε[softplus(μ + ε)] by eager's Gauss–Hermite rule (in
// float32 read from a table of the rule).

// glibc declares its SIMD math (libmvec: expf, log1pf, sinf, ... on whole vector registers) only under __FAST_MATH__.
// Ask for those declarations alone: the rest of fast-math (no NaN/Inf, reassociation) stays off.
#define __FAST_MATH__ 1
#include <math.h>
#undef __FAST_MATH__

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kTaps = 9;
constexpr int kFilters = 4;
constexpr int kFeatures = 2 * kFilters + 2;
constexpr int kNodes = 8;  // Gauss–Hermite nodes of the expected-noise mode (eager's MetaPerturbModel.expected_noise_nodes)

// ---------------------------------------------------------------------------------------------------------------
// Noise: Philox4x32-10 (Salmon et al., 2011), 4 words per 64-bit counter, Box–Muller to 4 normals.

inline void philox(uint64_t counter, uint64_t seed, uint32_t& o0, uint32_t& o1, uint32_t& o2, uint32_t& o3) {
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
  o0 = c0; o1 = c1; o2 = c2; o3 = c3;
}

// The C functions, not std::exp & co.: only those carry glibc's SIMD declarations, so only they vectorise.
inline float vexp(float x) { return ::expf(x); }
inline double vexp(double x) { return ::exp(x); }
inline float vlog(float x) { return ::logf(x); }
inline double vlog(double x) { return ::log(x); }
inline float vlog1p(float x) { return ::log1pf(x); }
inline double vlog1p(double x) { return ::log1p(x); }
inline float vcos(float x) { return ::cosf(x); }
inline double vcos(double x) { return ::cos(x); }

template <typename T>
inline T uniform(uint32_t word) {  // the top 24 bits, in (0, 1); through int32 so that the conversion vectorises
  return (T(int32_t(word >> 8)) + T(0.5)) * T(1.0 / 16777216.0);
}

// Standard normals of the elements [start, start + n) of stream `seed` into `out`; `buffer` holds n + 8 values.
// Element e is lane e % 4 of counter e / 4: lanes 0, 1 are the cosine and sine of the pair (word 0, word 1), lanes
// 2, 3 those of (word 2, word 3). Two vectorised loops: the words, then Box–Muller (the sine as a shifted cosine, or
// the compiler fuses the pair into a sincos call that does not vectorise).
template <typename T>
void fill_normals(uint64_t seed, int64_t start, int64_t n, T* out, T* buffer) {
  const int64_t first = start >> 2, groups = ((start + n - 1) >> 2) - first + 1;
  thread_local std::vector<uint32_t> words;
  words.resize(size_t(4 * groups));
  uint32_t *w0 = words.data(), *w1 = w0 + groups, *w2 = w1 + groups, *w3 = w2 + groups;
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) philox(uint64_t(first + g), seed, w0[g], w1[g], w2[g], w3[g]);
  const T two_pi = T(6.283185307179586), quarter_turn = T(1.5707963267948966);
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    const T r01 = std::sqrt(T(-2) * vlog(uniform<T>(w0[g]))), a01 = two_pi * uniform<T>(w1[g]);
    const T r23 = std::sqrt(T(-2) * vlog(uniform<T>(w2[g]))), a23 = two_pi * uniform<T>(w3[g]);
    buffer[4 * g] = r01 * vcos(a01);
    buffer[4 * g + 1] = r01 * vcos(a01 - quarter_turn);
    buffer[4 * g + 2] = r23 * vcos(a23);
    buffer[4 * g + 3] = r23 * vcos(a23 - quarter_turn);
  }
  std::memcpy(out, buffer + (start - 4 * first), sizeof(T) * n);
}

template <typename T>
inline T softplus(T x) {  // F.softplus with beta 1, threshold 20; no call under a branch, so that it vectorises
  const T smooth = vlog1p(vexp(x < T(20) ? x : T(20)));
  return x > T(20) ? x : smooth;
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + vexp(-x));
}

// The Gauss–Hermite rule E[f(ε)] ≈ Σ w_k f(n_k) in double, with e^{±n_k} precomputed; float32 reads its table.
struct NoiseTable;
struct Quadrature {
  double node[kNodes], weight[kNodes], exp_node[kNodes], exp_neg_node[kNodes];
  const NoiseTable* table = nullptr;
};

// E_ε[softplus(μ + ε)] and (WithSlope) E_ε[sigmoid(μ + ε)] by the rule, with one exp for all nodes: for x = μ + n,
// e^{-x} = e^{-μ}·e^{-n} and e^{x} = e^{μ}·e^{n}, the smaller of the two is e^{-|x|}, softplus(x) = max(x, 0) +
// log1p(e^{-|x|}) and sigmoid(x) = 1 / (1 + e^{-x}). Where e^{±μ} overflows the other is 0 and the minimum still right,
// so no clamp is needed. Written without branches and with the node loop unrolled, so that the channel loop around it
// vectorises.
template <bool WithSlope>
inline double rule_softplus(const Quadrature& Q, double mu, double& slope) {
  const double up = vexp(mu), down = 1.0 / up;
  double z = 0, grad = 0;
#pragma GCC unroll 8
  for (int k = 0; k < kNodes; ++k) {
    const double exp_neg_x = down * Q.exp_neg_node[k];
    z += Q.weight[k] * (std::max(mu + Q.node[k], 0.0) + vlog1p(std::min(exp_neg_x, up * Q.exp_node[k])));
    if constexpr (WithSlope) grad += Q.weight[k] / (1.0 + exp_neg_x);
  }
  slope = grad;
  return z;
}

// float32's expected noise: the rule's value and slope (in double) at steps of 1/16 on [−32, 16], one cubic per step
// through both ends' values and slopes (a cubic Hermite piece errs by h⁴/384 · max|g⁗|, far below float32's rounding
// at h = 1/16), one table read instead of eight log1p per element. Below −32 the value is under 1e-13 (the
// table's first entry stands for it); from 16 up it is μ to float precision, the slope 1.
constexpr int kTableStepsPerUnit = 16;
constexpr float kTableLow = -32.0f, kTableHigh = 16.0f;
constexpr int kTableIntervals = int(kTableHigh - kTableLow) * kTableStepsPerUnit;

struct NoiseTable {
  float c0[kTableIntervals], c1[kTableIntervals], c2[kTableIntervals], c3[kTableIntervals];  // the cubic in u ∈ [0, 1)
};

NoiseTable tabulate(const Quadrature& Q) {
  double value[kTableIntervals + 1], slope[kTableIntervals + 1];
  for (int p = 0; p <= kTableIntervals; ++p)
    value[p] = rule_softplus<true>(Q, double(kTableLow) + double(p) / kTableStepsPerUnit, slope[p]);
  NoiseTable table;
  const double h = 1.0 / kTableStepsPerUnit;
  for (int i = 0; i < kTableIntervals; ++i) {  // Hermite: c0 + c1 u + c2 u² + c3 u³ with the ends' values, slopes
    const double v0 = value[i], v1 = value[i + 1], d0 = h * slope[i], d1 = h * slope[i + 1];
    table.c0[i] = float(v0);
    table.c1[i] = float(d0);
    table.c2[i] = float(3.0 * (v1 - v0) - 2.0 * d0 - d1);
    table.c3[i] = float(2.0 * (v0 - v1) + d0 + d1);
  }
  return table;
}

// The table of a rule, made on its first use (every call passes eager's rule, so in practice there is one).
const NoiseTable* table_for(const Quadrature& Q) {
  static std::mutex mutex;
  static std::vector<std::pair<std::vector<double>, std::unique_ptr<NoiseTable>>> tables;
  std::vector<double> rule(Q.node, Q.node + kNodes);
  rule.insert(rule.end(), Q.weight, Q.weight + kNodes);
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [known, table] : tables)
    if (known == rule) return table.get();
  tables.emplace_back(rule, std::make_unique<NoiseTable>(tabulate(Q)));
  return tables.back().second.get();
}

// The table at μ; branch-free (the table read by index: a gather when vectorised), NaN goes through as NaN.
template <bool WithSlope>
inline float tabulated_softplus(const NoiseTable& table, float mu, float& slope) {
  const float x = mu > kTableLow ? (mu < kTableHigh ? mu : kTableHigh) : kTableLow;  // NaN → kTableLow
  const float position = (x - kTableLow) * float(kTableStepsPerUnit);
  const int i = std::min(int(position), kTableIntervals - 1);
  const float u = position - float(i);
  const float c1 = table.c1[i], c2 = table.c2[i], c3 = table.c3[i];
  const float z = table.c0[i] + u * (c1 + u * (c2 + u * c3));
  if constexpr (WithSlope) {
    const float inside = (c1 + u * (2.0f * c2 + 3.0f * u * c3)) * float(kTableStepsPerUnit);
    slope = mu >= kTableHigh ? 1.0f : (mu < kTableHigh ? inside : mu);
  }
  return mu < kTableHigh ? z : mu;
}

template <typename T, bool WithSlope>
inline T expected_softplus(const Quadrature& Q, T mu, T& slope) {
  if constexpr (std::is_same_v<T, float>) return tabulated_softplus<WithSlope>(*Q.table, mu, slope);
  else return rule_softplus<WithSlope>(Q, mu, slope);
}

// z and dz/dμ for the noise's argument a: sampled (a = μ + ε, z = softplus(a)) or expected (a = μ).
template <typename T, bool Expected>
inline T noise_of(const Quadrature& Q, T a) {
  T unused;
  if constexpr (Expected) return expected_softplus<T, false>(Q, a, unused);
  else return softplus(a);
}

template <typename T, bool Expected>
inline T noise_and_slope(const Quadrature& Q, T a, T& slope) {
  if constexpr (Expected) return expected_softplus<T, true>(Q, a, slope);
  else {
    slope = sigmoid(a);
    return softplus(a);
  }
}

inline bool finite_bits(float v) { uint32_t u; std::memcpy(&u, &v, 4); return (u & 0x7f800000u) != 0x7f800000u; }
inline bool finite_bits(double v) {
  uint64_t u; std::memcpy(&u, &v, 8); return (u & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// ---------------------------------------------------------------------------------------------------------------
// Planes with a zero border: (H + 2) × (W + 2) × C, the image at rows and columns 1..H, 1..W.

struct Shape {
  int64_t H, W, C;
  int64_t padded() const { return (H + 2) * (W + 2) * C; }
  int64_t row() const { return W * C; }
};

template <typename T>
inline T* interior_row(T* plane, const Shape& s, int64_t i) { return plane + ((i + 1) * (s.W + 2) + 1) * s.C; }
template <typename T>
inline const T* interior_row(const T* plane, const Shape& s, int64_t i) {
  return plane + ((i + 1) * (s.W + 2) + 1) * s.C;
}

// The nine inputs of output row i: tap t = (di + 1)·3 + (dj + 1) reads plane[i + di, j + dj].
template <typename T>
inline void taps(const T* plane, const Shape& s, int64_t i, const T* nb[kTaps]) {
  for (int di = -1; di <= 1; ++di)
    for (int dj = -1; dj <= 1; ++dj) nb[(di + 1) * 3 + dj + 1] = plane + ((i + 1 + di) * (s.W + 2) + 1 + dj) * s.C;
}

// One kernel over the nine shifted inputs of an output row, held in locals so that the vectoriser sees invariant
// pointers and weights (through an array it gives up: "complicated access pattern").
template <typename T>
struct Row {
  const T *p0, *p1, *p2, *p3, *p4, *p5, *p6, *p7, *p8;
  T k0, k1, k2, k3, k4, k5, k6, k7, k8;
  Row(const T* const* nb, const T* k)
      : p0(nb[0]), p1(nb[1]), p2(nb[2]), p3(nb[3]), p4(nb[4]), p5(nb[5]), p6(nb[6]), p7(nb[7]), p8(nb[8]),
        k0(k[0]), k1(k[1]), k2(k[2]), k3(k[3]), k4(k[4]), k5(k[5]), k6(k[6]), k7(k[7]), k8(k[8]) {}
  T operator()(int64_t e) const {
    return k0 * p0[e] + k1 * p1[e] + k2 * p2[e] + k3 * p3[e] + k4 * p4[e] + k5 * p5[e] + k6 * p6[e] + k7 * p7[e] +
           k8 * p8[e];
  }
};

// out[e] += ReLU(k ⋆ row)[e]. The Row is built here, not passed: a struct argument stays in memory and the loop
// then does not vectorise.
template <typename T>
void add_relu(const T* const* nb, const T* k, T* __restrict out, int64_t n) {
  const Row<T> r(nb, k);
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) out[e] += std::max(r(e), T(0));
}

// out[e] += Σ_q k_q ⋆ row_q [e] for four kernels, each on its own nine inputs.
template <typename T>
void add_four(const T* const (*nb)[kTaps], const T (*k)[kTaps], T* __restrict out, int64_t n) {
  const Row<T> r0(nb[0], k[0]), r1(nb[1], k[1]), r2(nb[2], k[2]), r3(nb[3], k[3]);
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) out[e] += (r0(e) + r1(e)) + (r2(e) + r3(e));
}

// out (unpadded, H·W·C) = k ⋆ plane (+ out when `add`).
template <typename T>
void stencil(const T* plane, const Shape& s, const T* k, T* out, bool add) {
  const T* nb[kTaps];
  const int64_t n = s.row();
  for (int64_t i = 0; i < s.H; ++i) {
    taps(plane, s, i, nb);
    const Row<T> r(nb, k);
    T* __restrict o = out + i * n;
    if (add) {
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) o[e] += r(e);
    } else {
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) o[e] = r(e);
    }
  }
}

// grad_k[t] += Σ grad[p] · plane[p + offset_t] over the image (grad unpadded, H·W·C): a shared kernel's gradient.
template <typename T>
void kernel_grad(const T* grad, const T* plane, const Shape& s, double* grad_k) {
  const T* nb[kTaps];
  const int64_t n = s.row();
  for (int64_t i = 0; i < s.H; ++i) {
    taps(plane, s, i, nb);
    const T* g = grad + i * n;
    for (int t = 0; t < kTaps; ++t) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t e = 0; e < n; ++e) acc += g[e] * nb[t][e];
      grad_k[t] += acc;
    }
  }
}

// Copies an unpadded image (H·W·C, channels-last) into the interior of a padded plane.
template <typename T>
void pad_into(const T* image, const Shape& s, T* plane) {
  for (int64_t i = 0; i < s.H; ++i) std::memcpy(interior_row(plane, s, i), image + i * s.row(), sizeof(T) * s.row());
}

// mean over channels of a padded plane into the interior of a padded single-channel plane.
template <typename T>
void channel_mean(const T* plane, const Shape& s, T* mean) {
  const Shape one{s.H, s.W, 1};
  for (int64_t i = 0; i < s.H; ++i) {
    const T* r = interior_row(plane, s, i);
    T* m = interior_row(mean, one, i);
    for (int64_t j = 0; j < s.W; ++j) {
      T acc = 0;
      for (int64_t c = 0; c < s.C; ++c) acc += r[j * s.C + c];
      m[j] = acc / T(s.C);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------

template <typename T>
void flip(const T* k, T* flipped) {
  for (int t = 0; t < kTaps; ++t) flipped[t] = k[kTaps - 1 - t];
}

// Everything about one call that is not a full-size tensor.
template <typename T>
struct Params {
  int64_t B;
  Shape s;
  T lam[2][kTaps], gam[2][kTaps], stat[kFilters][kTaps];
  T flipped_lam[2][kTaps], flipped_gam[2][kTaps], flipped_stat[kFilters][kTaps];  // for transposed stencils
  T kappa;
  bool clip;
  T clip_value;
  bool drawn;  // noise from Philox (else from the noise tensor)
  uint64_t seed;
  bool expected;  // the expected-noise mode: no ε, z = E_ε[softplus(μ + ε)]
  Quadrature quadrature;
};

template <typename T>
Params<T> read_params(const at::Tensor& x, const at::Tensor& lam, const at::Tensor& gam, const at::Tensor& stat,
                      double kappa, c10::optional<double> clip, const c10::optional<at::Tensor>& noise,
                      const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& quadrature) {
  Params<T> P;
  P.B = x.size(0);
  P.s = Shape{x.size(2), x.size(3), x.size(1)};
  auto l = lam.contiguous(), g = gam.contiguous(), k = stat.contiguous();
  for (int t = 0; t < kTaps; ++t) {
    for (int q = 0; q < 2; ++q) {
      P.lam[q][t] = l.data_ptr<T>()[q * kTaps + t];
      P.gam[q][t] = g.data_ptr<T>()[q * kTaps + t];
    }
    for (int q = 0; q < kFilters; ++q) P.stat[q][t] = k.data_ptr<T>()[q * kTaps + t];
  }
  for (int q = 0; q < 2; ++q) { flip(P.lam[q], P.flipped_lam[q]); flip(P.gam[q], P.flipped_gam[q]); }
  for (int q = 0; q < kFilters; ++q) flip(P.stat[q], P.flipped_stat[q]);
  P.kappa = T(kappa);
  P.clip = clip.has_value();
  P.clip_value = T(clip.value_or(0.0));
  P.expected = quadrature.has_value();
  P.drawn = !noise.has_value() && !P.expected;
  TORCH_CHECK(!P.drawn || seed.has_value(), "phi_cpu: neither noise nor a seed was given");
  P.seed = P.drawn ? uint64_t(seed->item<int64_t>()) : 0;
  if (P.expected) {
    TORCH_CHECK(quadrature->dim() == 2 && quadrature->size(0) == 2 && quadrature->size(1) == kNodes,
                "phi_cpu: the expected-noise mode needs a (2, ", kNodes, ") tensor of Gauss–Hermite nodes and weights");
    const auto q = quadrature->to(at::kDouble).contiguous();
    const double* data = q.data_ptr<double>();
    for (int k = 0; k < kNodes; ++k) {
      P.quadrature.node[k] = data[k];
      P.quadrature.weight[k] = data[kNodes + k];
      P.quadrature.exp_node[k] = std::exp(data[k]);
      P.quadrature.exp_neg_node[k] = std::exp(-data[k]);
    }
    P.quadrature.table = std::is_same_v<T, float> ? table_for(P.quadrature) : nullptr;
  }
  return P;
}

// One thread's planes for one image at a time (zeroed once: only interiors are ever written).
template <typename T>
struct Scratch {
  Shape s;
  std::vector<T> data;
  int64_t padded, padded_one, image;
  Scratch(const Shape& shape, int planes, int single_channel_planes, int images)
      : s(shape), padded(shape.padded()), padded_one((shape.H + 2) * (shape.W + 2)), image(shape.H * shape.W * shape.C) {
    data.assign(size_t(planes * padded + single_channel_planes * padded_one + images * (image + 8)), T(0));
    planes_ = planes;
    single_ = single_channel_planes;
  }
  T* plane(int q) { return data.data() + q * padded; }
  T* one(int q) { return data.data() + planes_ * padded + q * padded_one; }
  T* flat(int q) { return data.data() + planes_ * padded + single_ * padded_one + q * (image + 8); }
  int planes_, single_;
};

// The hidden layer ReLU(λ₁ ⋆ x + γ₁ ⋆ m1) of one image into padded `hidden`, given x padded in `xp`; m1 and m2
// (padded single-channel) get the channel means of x and of the hidden layer, `g` (H·W) is scratch.
template <typename T>
void hidden_layer(const Params<T>& P, const T* xp, T* hidden, T* m1, T* m2, T* g) {
  const Shape& s = P.s;
  const Shape one{s.H, s.W, 1};
  channel_mean(xp, s, m1);
  for (int64_t i = 0; i < s.H; ++i) {
    const T* m = interior_row(m1, one, i);
    for (int64_t j = 0; j < s.W; ++j)
      TORCH_CHECK_VALUE(finite_bits(m[j]), "hidden_states contains NaN or Inf; the features reaching this site are "
                        "already broken (check the input data and the layers before it).");
  }
  stencil(m1, one, P.gam[0], g, false);
  const T* nb[kTaps];
  for (int64_t i = 0; i < s.H; ++i) {
    taps(xp, s, i, nb);
    const Row<T> r(nb, P.lam[0]);
    T* __restrict o = interior_row(hidden, s, i);
    for (int64_t j = 0; j < s.W; ++j) {
      const T shared = g[i * s.W + j];
      const int64_t base = j * s.C;
#pragma omp simd
      for (int64_t c = 0; c < s.C; ++c) {
        const T acc = shared + r(base + c);
        o[base + c] = acc > T(0) ? acc : T(0);
      }
    }
  }
  channel_mean(hidden, s, m2);
}

// μ + ε = λ₂ ⋆ hidden + γ₂ ⋆ m2 + ε of image b into `argument` (unpadded), μ alone in the expected-noise mode;
// `noise` is the image's explicit noise or null (drawn); `buffer` (H·W·C + 8) and `g` (H·W) are scratch.
template <typename T>
void noise_argument(const Params<T>& P, int64_t b, const T* hidden, const T* m2, const T* noise, T* buffer, T* g,
                    T* argument) {
  const Shape& s = P.s;
  const int64_t n = s.H * s.W * s.C;
  if (P.expected) {
    std::fill(argument, argument + n, T(0));
  } else if (noise == nullptr) {
    fill_normals(P.seed, b * n, n, argument, buffer);
  } else {
    std::memcpy(argument, noise, sizeof(T) * n);
  }
  stencil(m2, Shape{s.H, s.W, 1}, P.gam[1], g, false);
  const T* nb[kTaps];
  for (int64_t i = 0; i < s.H; ++i) {
    taps(hidden, s, i, nb);
    const Row<T> r(nb, P.lam[1]);
    T* __restrict o = argument + i * s.row();
    for (int64_t j = 0; j < s.W; ++j) {
      const T shared = g[i * s.W + j];
      const int64_t base = j * s.C;
#pragma omp simd
      for (int64_t c = 0; c < s.C; ++c) o[base + c] += shared + r(base + c);
    }
  }
}

// Writes an image (channels-last, unpadded) into `out`, whatever its strides.
template <typename T>
void write_image(const T* image, int64_t b, const at::Tensor& out, const Shape& s) {
  T* base = out.data_ptr<T>();
  const int64_t sb = out.stride(0), sc = out.stride(1), sh = out.stride(2), sw = out.stride(3);
  for (int64_t i = 0; i < s.H; ++i)
    for (int64_t j = 0; j < s.W; ++j) {
      T* __restrict o = base + b * sb + i * sh + j * sw;
      const T* in = image + (i * s.W + j) * s.C;
      if (sc == 1) {
        std::memcpy(o, in, sizeof(T) * s.C);
      } else {
        for (int64_t c = 0; c < s.C; ++c) o[c * sc] = in[c];
      }
    }
}

// An image's output x · ((1 − κ) + κ s z) (clamped) from its noise argument `a`; returns the sum of its z.
template <typename T, bool Expected>
double perturb_image(const Params<T>& P, const T* a, const T* xb, const T* S, T limit, T* __restrict o) {
  const int64_t C = P.s.C, HW = P.s.H * P.s.W;
  const Quadrature Q = P.quadrature;
  double z_sum = 0;
  for (int64_t p = 0; p < HW; ++p) {
    const int64_t base = p * C;
    T zs = 0;
#pragma omp simd reduction(+ : zs)
    for (int64_t c = 0; c < C; ++c) {
      const T z = noise_of<T, Expected>(Q, a[base + c]);
      zs += z;
      o[base + c] = std::min(xb[base + c] * ((T(1) - P.kappa) + P.kappa * S[c] * z), limit);
    }
    z_sum += zs;
  }
  return z_sum;
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& h, const at::Tensor& lam, const at::Tensor& gam,
                                     const at::Tensor& stat, const at::Tensor& weight, const at::Tensor& running_mean,
                                     const at::Tensor& running_var, const c10::optional<at::Tensor>& noise,
                                     const c10::optional<at::Tensor>& seed,
                                     const c10::optional<at::Tensor>& quadrature, double kappa, c10::optional<double> clip,
                                     double channel_descriptor, double spatial_descriptor, bool training) {
  const auto x = h.contiguous(at::MemoryFormat::ChannelsLast);
  const auto params = read_params<T>(x, lam, gam, stat, kappa, clip, noise, seed, quadrature);
  const auto& P = params;
  const Shape& s = P.s;
  const int64_t B = P.B, C = s.C, HW = s.H * s.W, n = HW * C;
  const T* X = x.data_ptr<T>();
  at::Tensor noise_cl;
  if (noise.has_value()) noise_cl = noise->to(x.dtype()).contiguous(at::MemoryFormat::ChannelsLast);
  const T* E = noise_cl.defined() ? noise_cl.data_ptr<T>() : nullptr;
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  const int threads = at::get_num_threads();

  // 1. Pooled responses u[b, c, k] = mean_HW ReLU(K_k ⋆ x) (training only: evaluation uses the running statistics).
  auto pooled = training ? at::empty({B, C, kFilters}, options) : at::empty({0}, options);
  if (training) {
    T* U = pooled.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const Params<T> P = params;  // local copies: the vectoriser cannot hoist loads through captured references
      Scratch<T> scratch(s, 1, 0, 0);
      std::vector<T> sums(static_cast<size_t>(kFilters * s.row()));
      T* xp = scratch.plane(0);
      const T* nb[kTaps];
      for (int64_t b = begin; b < end; ++b) {
        pad_into(X + b * n, s, xp);
        std::fill(sums.begin(), sums.end(), T(0));
        for (int64_t i = 0; i < s.H; ++i) {
          taps(xp, s, i, nb);
          const int64_t row = s.row();
          for (int q = 0; q < kFilters; ++q) {
            add_relu(nb, P.stat[q], sums.data() + q * row, row);
          }
        }
        for (int q = 0; q < kFilters; ++q)
          for (int64_t c = 0; c < C; ++c) {
            T acc = 0;
            for (int64_t j = 0; j < s.W; ++j) acc += sums[q * s.row() + j * C + c];
            U[(b * C + c) * kFilters + q] = acc / T(HW);
          }
      }
    });
  }

  // 2. Features [mean (4), var (4), C / C_norm, H / H_norm] per channel and the channel scale s.
  auto features = at::empty({C, kFeatures}, options);
  auto scale = at::empty({C}, options);
  {
    T* Fe = features.data_ptr<T>();
    const auto rm = running_mean.contiguous(), rv = running_var.contiguous();
    const T* U = training ? pooled.data_ptr<T>() : nullptr;
    for (int64_t c = 0; c < C; ++c)
      for (int q = 0; q < kFilters; ++q) {
        T mean, var;
        if (training) {
          double sum = 0, squares = 0;
          for (int64_t b = 0; b < B; ++b) sum += U[(b * C + c) * kFilters + q];
          const double m = sum / double(B);
          for (int64_t b = 0; b < B; ++b) {
            const double d = U[(b * C + c) * kFilters + q] - m;
            squares += d * d;
          }
          mean = T(m);
          var = B > 1 ? T(squares / double(B - 1)) : T(0);  // unbiased; 0 for a batch of one
        } else {
          mean = rm.data_ptr<T>()[c * kFilters + q];
          var = rv.data_ptr<T>()[c * kFilters + q];
        }
        Fe[c * kFeatures + q] = mean;
        Fe[c * kFeatures + kFilters + q] = var;
      }
    const auto w = weight.contiguous();
    const T* Wt = w.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      Fe[c * kFeatures + 2 * kFilters] = T(channel_descriptor);
      Fe[c * kFeatures + 2 * kFilters + 1] = T(spatial_descriptor);
      T logit = 0;
      for (int64_t f = 0; f < kFeatures; ++f) logit += Fe[c * kFeatures + f] * Wt[f];
      scale.data_ptr<T>()[c] = sigmoid(logit);
    }
  }

  // 3. Per image: hidden layer, μ + ε, z = softplus(μ + ε), the output (and the argument, when saved).
  auto output = at::empty_like(h);
  const bool direct = output.strides() == x.strides();  // channels-last output: write it in place
  std::vector<double> noise_sums(threads, 0.0);
  const T* scale_data = scale.data_ptr<T>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const Params<T> P = params;  // local copies: the vectoriser cannot hoist loads through captured references
    const Shape s = P.s;
    const int64_t C = s.C, HW = s.H * s.W, n = HW * C;
    const T* S = scale_data;
    const T limit = P.clip ? P.clip_value : std::numeric_limits<T>::infinity();  // the clamp, or none
    Scratch<T> scratch(s, 2, 2, 3);
    T *xp = scratch.plane(0), *hidden = scratch.plane(1), *m1 = scratch.one(0), *m2 = scratch.one(1);
    T *buffer = scratch.flat(0), *arg = scratch.flat(1), *out = scratch.flat(2);
    std::vector<T> g(static_cast<size_t>(HW));
    double z_sum = 0;
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = X + b * n;
      pad_into(xb, s, xp);
      hidden_layer(P, xp, hidden, m1, m2, g.data());
      T* a = arg;
      noise_argument(P, b, hidden, m2, E == nullptr ? nullptr : E + b * n, buffer, g.data(), a);
      T* o = direct ? output.data_ptr<T>() + b * n : out;
      z_sum += P.expected ? perturb_image<T, true>(P, a, xb, S, limit, o) : perturb_image<T, false>(P, a, xb, S, limit, o);
      if (!direct) write_image(out, b, output, s);
    }
    noise_sums[at::get_thread_num()] += z_sum;
  });
  double total = 0;
  for (double v : noise_sums) total += v;
  auto noise_mean = at::full({}, total / double(B * n), options);
  return {output, scale, noise_mean, pooled, features};
}

// The backward through z and the direct path for one image: grad_x = g · multiplier into `gxb`, grad_mu = g · x · κ s
// dz/dμ into padded `grad_mu` (and its channel sums into padded `sum_mu`), s's partial gradient added to `gsi`.
template <typename T, bool Expected>
void through_noise(const Params<T>& P, const T* a, const T* xb, const T* gb, const T* S, T limit, T* __restrict gxb,
                   T* grad_mu, T* sum_mu, T* gsi) {
  const Shape& s = P.s;
  const Shape one{s.H, s.W, 1};
  const int64_t C = s.C;
  const Quadrature Q = P.quadrature;
  for (int64_t i = 0; i < s.H; ++i) {
    T* gm_row = interior_row(grad_mu, s, i);
    T* sm_row = interior_row(sum_mu, one, i);
    for (int64_t j = 0; j < s.W; ++j) {
      const int64_t base = (i * s.W + j) * C, local = j * C;
      T total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t c = 0; c < C; ++c) {
        const T xc = xb[base + c];
        T slope;
        const T z = noise_and_slope<T, Expected>(Q, a[base + c], slope);
        const T multiplier = (T(1) - P.kappa) + P.kappa * S[c] * z;
        const T gc = T(xc * multiplier <= limit) * gb[base + c];  // no gradient where clamped
        const T gxz = gc * xc;
        gsi[c] += gxz * z;
        gxb[base + c] = gc * multiplier;
        const T gm = gxz * P.kappa * S[c] * slope;
        gm_row[local + c] = gm;
        total += gm;
      }
      sm_row[j] = total;
    }
  }
}

// Backward. Phase 1 per image: recompute the hidden layer and μ + ε, the gradient through the noise
// path and the direct path, and the partial gradient of s. Then s's gradient over the whole batch gives that of the
// pooled statistics, and phase 2 per image adds the statistics filters' path (training only).
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_output, const at::Tensor& h, const at::Tensor& lam,
                                      const at::Tensor& gam, const at::Tensor& stat, const at::Tensor& weight,
                                      const at::Tensor& pooled, const at::Tensor& features, const at::Tensor& scale,
                                      const c10::optional<at::Tensor>& noise,
                                      const c10::optional<at::Tensor>& seed,
                                      const c10::optional<at::Tensor>& quadrature, double kappa, c10::optional<double> clip,
                                      bool training, bool needs_input, bool needs_params) {
  const auto x = h.contiguous(at::MemoryFormat::ChannelsLast);
  const auto go = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const auto params = read_params<T>(x, lam, gam, stat, kappa, clip, noise, seed, quadrature);
  const auto& P = params;
  const Shape& s = P.s;
  const Shape one{s.H, s.W, 1};
  const int64_t B = P.B, C = s.C, HW = s.H * s.W, n = HW * C;
  const T* X = x.data_ptr<T>();
  const T* G = go.data_ptr<T>();
  at::Tensor noise_cl;
  if (noise.has_value()) noise_cl = noise->to(x.dtype()).contiguous(at::MemoryFormat::ChannelsLast);
  const T* E = noise_cl.defined() ? noise_cl.data_ptr<T>() : nullptr;
  const T* scale_data = scale.data_ptr<T>();
  const int threads = at::get_num_threads();
  auto grad_x_cl = at::empty_like(x);  // phase 2 adds to it
  T* GX = grad_x_cl.data_ptr<T>();
  // Per-thread accumulators: s's gradient per channel; λ₁, λ₂, γ₁, γ₂ (9 each); K₁..K₄ (9 each).
  std::vector<std::vector<double>> grad_scale_parts(threads, std::vector<double>(C, 0.0));
  std::vector<std::vector<double>> kernel_parts(threads, std::vector<double>(4 * kTaps, 0.0));
  std::vector<std::vector<double>> stat_parts(threads, std::vector<double>(kFilters * kTaps, 0.0));

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const Params<T> P = params;  // local copies: the vectoriser cannot hoist loads through captured references
    const Shape s = P.s;
    const int64_t C = s.C, HW = s.H * s.W, n = HW * C;
    const T* S = scale_data;
    const T limit = P.clip ? P.clip_value : std::numeric_limits<T>::infinity();  // the clamp, or none
    Scratch<T> scratch(s, 4, 4, 2);
    T *xp = scratch.plane(0), *hidden = scratch.plane(1), *grad_mu = scratch.plane(2), *grad_hidden = scratch.plane(3);
    T *m1 = scratch.one(0), *m2 = scratch.one(1), *sum_mu = scratch.one(2), *sum_hidden = scratch.one(3);
    const T inv_c = T(1) / T(C);
    T *buffer = scratch.flat(0), *arg = scratch.flat(1);
    std::vector<T> g(static_cast<size_t>(HW)), grad_scale_image(static_cast<size_t>(C));
    double* grad_scale = grad_scale_parts[at::get_thread_num()].data();
    double* grad_k = kernel_parts[at::get_thread_num()].data();
    const T* nb[kTaps];
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = X + b * n;
      const T* gb = G + b * n;
      T* gxb = GX + b * n;
      pad_into(xb, s, xp);
      hidden_layer(P, xp, hidden, m1, m2, g.data());
      noise_argument(P, b, hidden, m2, E == nullptr ? nullptr : E + b * n, buffer, g.data(), arg);
      const T* a = arg;
      // Through z and the direct path: grad_x = g · multiplier, grad_mu = g · x · κ s dz/dμ.
      std::fill(grad_scale_image.begin(), grad_scale_image.end(), T(0));
      T* gsi = grad_scale_image.data();
      if (P.expected) {
        through_noise<T, true>(P, a, xb, gb, S, limit, gxb, grad_mu, sum_mu, gsi);
      } else {
        through_noise<T, false>(P, a, xb, gb, S, limit, gxb, grad_mu, sum_mu, gsi);
      }
      for (int64_t c = 0; c < C; ++c) grad_scale[c] += double(gsi[c]);
      // μ = λ₂ ⋆ hidden + γ₂ ⋆ m2: grad_hidden = (λ₂ᵀ ⋆ grad_mu + γ₂ᵀ ⋆ Σ_c grad_mu / C) · [hidden > 0].
      stencil(sum_mu, one, P.flipped_gam[1], g.data(), false);
      for (int64_t i = 0; i < s.H; ++i) {
        taps(grad_mu, s, i, nb);
        const Row<T> r(nb, P.flipped_lam[1]);
        const T* hp = interior_row(hidden, s, i);
        T* __restrict o = interior_row(grad_hidden, s, i);
        T* sh_row = interior_row(sum_hidden, one, i);
        for (int64_t j = 0; j < s.W; ++j) {
          const T common = g[i * s.W + j] * inv_c;
          const int64_t base = j * C;
          T total = 0;
#pragma omp simd reduction(+ : total)
          for (int64_t c = 0; c < C; ++c) {
            const T acc = T(hp[base + c] > T(0)) * (common + r(base + c));
            o[base + c] = acc;
            total += acc;
          }
          sh_row[j] = total;
        }
      }
      // hidden = ReLU(λ₁ ⋆ x + γ₁ ⋆ m1): grad_x += λ₁ᵀ ⋆ grad_hidden + γ₁ᵀ ⋆ Σ_c grad_hidden / C.
      stencil(sum_hidden, one, P.flipped_gam[0], g.data(), false);
      for (int64_t i = 0; i < s.H; ++i) {
        taps(grad_hidden, s, i, nb);
        const Row<T> r(nb, P.flipped_lam[0]);
        T* __restrict o = gxb + i * s.row();
        for (int64_t j = 0; j < s.W; ++j) {
          const T common = g[i * s.W + j] * inv_c;
          const int64_t base = j * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[base + c] += common + r(base + c);
        }
      }
      if (needs_params) {
        // kernel_grad takes the gradient unpadded: the padded planes' interiors are passed row by row below.
        for (int64_t i = 0; i < s.H; ++i) {
          std::memcpy(arg + i * s.row(), interior_row(grad_hidden, s, i), sizeof(T) * s.row());
          std::memcpy(buffer + i * s.row(), interior_row(grad_mu, s, i), sizeof(T) * s.row());
        }
        kernel_grad(arg, xp, s, grad_k);                  // λ₁
        kernel_grad(buffer, hidden, s, grad_k + kTaps);   // λ₂
        for (int64_t i = 0; i < s.H; ++i) {
          std::memcpy(g.data() + i * s.W, interior_row(sum_hidden, one, i), sizeof(T) * s.W);
        }
        kernel_grad(g.data(), m1, one, grad_k + 2 * kTaps);  // γ₁ (its input is the channel mean)
        for (int64_t i = 0; i < s.H; ++i) {
          std::memcpy(g.data() + i * s.W, interior_row(sum_mu, one, i), sizeof(T) * s.W);
        }
        kernel_grad(g.data(), m2, one, grad_k + 3 * kTaps);  // γ₂
      }
    }
  });

  // s = sigmoid(features · w): the gradients of w and of the batch statistics.
  const auto wc = weight.contiguous();
  const T* Wt = wc.data_ptr<T>();
  const T* Fe = features.data_ptr<T>();
  std::vector<double> grad_logit(C), grad_w(kFeatures, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    double gs = 0;
    for (int th = 0; th < threads; ++th) gs += grad_scale_parts[th][c];
    const double sc = scale_data[c];
    grad_logit[c] = gs * double(P.kappa) * sc * (1.0 - sc);
    for (int64_t f = 0; f < kFeatures; ++f) grad_w[f] += double(Fe[c * kFeatures + f]) * grad_logit[c];
  }
  if (training) {
    // grad_pooled[b, c, k] = (∂/∂mean / B + ∂/∂var · 2 (u − mean) / (B − 1)) / HW: the per-map scale of the gradient
    // that reaches ReLU(K_k ⋆ x) at every position.
    std::vector<T> grad_pooled(static_cast<size_t>(B * C * kFilters));
    const T* U = pooled.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c)
      for (int q = 0; q < kFilters; ++q) {
        const double gmean = grad_logit[c] * Wt[q], gvar = grad_logit[c] * Wt[kFilters + q];
        const double mean = Fe[c * kFeatures + q];
        for (int64_t b = 0; b < B; ++b) {
          double gp = gmean / double(B);
          if (B > 1) gp += gvar * 2.0 * (U[(b * C + c) * kFilters + q] - mean) / double(B - 1);
          grad_pooled[(b * C + c) * kFilters + q] = T(gp / double(HW));
        }
      }
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const Params<T> P = params;  // local copies: the vectoriser cannot hoist loads through captured references
    const Shape s = P.s;
    const int64_t C = s.C, HW = s.H * s.W, n = HW * C;
    const T* S = scale_data;
    const T limit = P.clip ? P.clip_value : std::numeric_limits<T>::infinity();  // the clamp, or none
      Scratch<T> scratch(s, 1 + kFilters, 0, 1);
      T* xp = scratch.plane(0);
      T* active = scratch.flat(0);
      double* grad_k = stat_parts[at::get_thread_num()].data();
      std::vector<T> gp_c(static_cast<size_t>(kFilters * C));
      const T* nb[kTaps];
      const T* nbq[kFilters][kTaps];
      for (int64_t b = begin; b < end; ++b) {
        const T* xb = X + b * n;
        T* gxb = GX + b * n;
        for (int64_t c = 0; c < C; ++c)
          for (int q = 0; q < kFilters; ++q) gp_c[q * C + c] = grad_pooled[(b * C + c) * kFilters + q];
        pad_into(xb, s, xp);
        // a_k = [K_k ⋆ x > 0] · grad_pooled[b, :, k]
        for (int64_t i = 0; i < s.H; ++i) {
          taps(xp, s, i, nb);
          for (int q = 0; q < kFilters; ++q) {
            T* __restrict o = interior_row(scratch.plane(1 + q), s, i);
            const T* gq = gp_c.data() + q * C;
            const Row<T> r(nb, P.stat[q]);
            for (int64_t j = 0; j < s.W; ++j) {
              const int64_t base = j * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) o[base + c] = T(r(base + c) > T(0)) * gq[c];
            }
          }
        }
        if (needs_input) {  // grad_x += Σ_k K_kᵀ ⋆ a_k
          for (int64_t i = 0; i < s.H; ++i) {
            for (int q = 0; q < kFilters; ++q) taps(scratch.plane(1 + q), s, i, nbq[q]);
            add_four<T>(nbq, P.flipped_stat, gxb + i * s.row(), s.row());
          }
        }
        if (needs_params) {
          for (int q = 0; q < kFilters; ++q) {
            for (int64_t i = 0; i < s.H; ++i)
              std::memcpy(active + i * s.row(), interior_row(scratch.plane(1 + q), s, i), sizeof(T) * s.row());
            kernel_grad(active, xp, s, grad_k + q * kTaps);
          }
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
    auto total = [&](const std::vector<std::vector<double>>& parts, int64_t offset, int64_t count) {
      auto out = at::zeros({count}, at::TensorOptions().dtype(at::kDouble));
      double* o = out.data_ptr<double>();
      for (const auto& part : parts)
        for (int64_t i = 0; i < count; ++i) o[i] += part[offset + i];
      return out.to(x.scalar_type());
    };
    grad_lam = at::cat({total(kernel_parts, 0, kTaps), total(kernel_parts, kTaps, kTaps)}).view(lam.sizes());
    grad_gam = at::cat({total(kernel_parts, 2 * kTaps, kTaps), total(kernel_parts, 3 * kTaps, kTaps)})
                   .view(gam.sizes());
    grad_stat = total(stat_parts, 0, kFilters * kTaps).view(stat.sizes());
    grad_weight =
        at::from_blob(grad_w.data(), {kFeatures}, at::TensorOptions().dtype(at::kDouble)).to(x.scalar_type(), false, true);
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
                                const c10::optional<at::Tensor>& seed,
                                const c10::optional<at::Tensor>& quadrature, double kappa, c10::optional<double> clip,
                                double channel_descriptor, double spatial_descriptor, bool training) {
  check(h, stat);
  return AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "phi_cpu_forward", [&] {
    return forward_impl<scalar_t>(h, lam, gam, stat, weight, running_mean, running_var, noise, seed, quadrature,
                                  kappa, clip, channel_descriptor, spatial_descriptor, training);
  });
}

std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& h, const at::Tensor& lam,
                                 const at::Tensor& gam, const at::Tensor& stat, const at::Tensor& weight,
                                 const at::Tensor& pooled, const at::Tensor& features, const at::Tensor& scale,
                                 const c10::optional<at::Tensor>& noise,
                                 const c10::optional<at::Tensor>& seed,
                                 const c10::optional<at::Tensor>& quadrature, double kappa, c10::optional<double> clip,
                                 bool training, bool needs_input, bool needs_params) {
  check(h, stat);
  return AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "phi_cpu_backward", [&] {
    return backward_impl<scalar_t>(grad_output, h, lam, gam, stat, weight, pooled, features, scale,
                                   noise, seed, quadrature, kappa, clip, training, needs_input, needs_params);
  });
}

// The standard normals a call with `seed` draws for features shaped like `like`, as a channels-last tensor: the
// fused path's noise, for a backward that is differentiated again (it reruns the eager math on the same ε).
at::Tensor normals(const at::Tensor& like, const at::Tensor& seed) {
  auto out = at::empty_like(like, like.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint64_t key = uint64_t(seed.item<int64_t>());
  const int64_t B = like.size(0), n = like.size(1) * like.size(2) * like.size(3);
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "phi_cpu_normals", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer(static_cast<size_t>(n + 8));
      for (int64_t b = begin; b < end; ++b) fill_normals(key, b * n, n, o + b * n, buffer.data());
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
