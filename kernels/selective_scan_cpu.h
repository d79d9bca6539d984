// Selective scan kernels, torch-free: the vector maths and the per-row /
// per-channel-group forward and backward. selective_scan_cpu.cpp binds them
// to torch (threads, tensors); scan_harness.cpp tests them on their own, also
// cross-compiled for aarch64 (Jetson) and run under qemu. See the .cpp for the design.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace edgediag_scan {


// One vector = one native register: 8 floats with AVX, 4 with SSE / NEON
// (wider generic vectors get split into pairs and run several times slower).
#if defined(__AVX__)
constexpr int kRegisterBytes = 32;
#else
constexpr int kRegisterBytes = 16;
#endif
constexpr int64_t kBlock = 64;  // steps per block of the wide layout: buffers stay in L1
// Bytes of a backward chunk's recomputed decays and states (2 x steps x Np):
// they stay in L1 with the adjoint's other streams (see chunk_steps).
constexpr int64_t kChunkBytes = 16 * 1024;

template <typename T>
struct Vec {
  static constexpr int kLanes = kRegisterBytes / sizeof(T);
  typedef T type __attribute__((vector_size(kRegisterBytes)));
};
constexpr int kLanes = Vec<float>::kLanes;
typedef Vec<float>::type vfloat;
typedef int32_t vint __attribute__((vector_size(kRegisterBytes)));
template <typename T>
using vec_t = typename Vec<T>::type;

// Broadcast. (An explicit initialiser: `vfloat{} + x` would cost a real add,
// as x + 0 is not an identity for x = -0.)
template <typename V, typename T, size_t... I>
inline V splat_impl(T x, std::index_sequence<I...>) {
  return V{((void)I, x)...};
}
template <typename T>
inline vec_t<T> splat(T x) {
  return splat_impl<vec_t<T>>(x, std::make_index_sequence<Vec<T>::kLanes>{});
}

// memcpy keeps unaligned loads/stores well-defined; compilers emit plain
// vector moves for it.
template <typename T>
inline vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, vec_t<T> v) { std::memcpy(p, &v, sizeof(v)); }

template <typename T>
inline T hsum(vec_t<T> v) {
  constexpr int K = Vec<T>::kLanes;
  T s[K];
  std::memcpy(s, &v, sizeof(s));
  for (int width = K / 2; width > 0; width /= 2) {  // pairwise tree
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  }
  return s[0];
}

// c0 r^k + c1 r^(k-1) + ... + ck by Horner's rule, coefficients highest first
// (one multiply-add each, in this order: the polynomials below are written once).
inline vfloat horner_from(vfloat, vfloat p) { return p; }
template <typename... Cs>
inline vfloat horner_from(vfloat r, vfloat p, float c, Cs... cs) { return horner_from(r, p * r + splat(c), cs...); }
template <typename... Cs>
inline vfloat horner(vfloat r, float c0, Cs... cs) { return horner_from(r, splat(c0), cs...); }

// Rounding to an integer n by adding 1.5 * 2^23 (exact for |n| < 2^22): the sum's
// low mantissa bits are then n itself, in two's complement.
constexpr float kRoundMagic = 12582912.0f;
constexpr int32_t kRoundMagicBits = 0x4B400000;

// 2^(n-1) from fx = n + kRoundMagic: n read from fx's bits, no float-to-int
// conversion; exponent field n - 1 + 127. Same-size vector cast = bit cast.
inline vfloat pow2_minus1(vfloat fx) { return (vfloat)(((vint)fx + (126 - kRoundMagicBits)) << 23); }

// exp(x) = 2^n * exp(r), x = n*ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2),
// exp(r) from Cephes' expf polynomial (max error ~1 ulp). The polynomial is
// evaluated as 2*exp(r) and scaled by 2^(n-1), so every n reached below
// log(FLT_MAX) has a finite 2^(n-1) without clamping. Arguments below
// -125*ln2 give 0 (the exact result is below 2.4e-38; a denormal would only
// slow later arithmetic down), above log(FLT_MAX) +inf; NaN stays NaN.
// Max relative error ~1.2e-7 on [-86.64, 88.72].
inline vfloat vexp(vfloat x) {
  const vfloat kMaxX = splat(88.72283905206835f);   // log(FLT_MAX)
  const vfloat kMinX = splat(-86.64339757f);       // -125 * ln2
  // round(x / ln2) with the 1.5 * 2^23 trick: exact for |x / ln2| < 2^22;
  // out-of-range lanes are overwritten by the masks at the end.
  const vfloat fx = x * splat(1.44269504088896341f) + splat(kRoundMagic);
  const vfloat n = fx - splat(kRoundMagic);
  vfloat r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);

  // 2 * (1 + r + r^2 * P(r)), P: Cephes expf coefficients, doubled
  const vfloat q = horner(r, 2.f * 1.9875691500e-4f, 2.f * 1.3981999507e-3f, 2.f * 8.3334519073e-3f,
                          2.f * 4.1665795894e-2f, 2.f * 1.6666665459e-1f, 2.f * 5.0000001201e-1f);
  const vfloat p = q * (r * r) + (r * splat(2.f) + splat(2.f));

  vfloat res = p * pow2_minus1(fx);
  res = x < kMinX ? splat(0.f) : res;
  res = x > kMaxX ? splat(std::numeric_limits<float>::infinity()) : res;
  return res;
}

// min(max(x, lo), hi) with NaN kept: one max and one min on x86 (GCC writes the
// same ternaries against a constant as a compare and a blend each).
inline vfloat vclamp(vfloat x, float lo, float hi) {
#if defined(__AVX__)
  return __builtin_ia32_minps256(splat(hi), __builtin_ia32_maxps256(splat(lo), x));  // NaN: the 2nd operand
#elif defined(__SSE__)
  return __builtin_ia32_minps(splat(hi), __builtin_ia32_maxps(splat(lo), x));
#else
  x = x < splat(lo) ? splat(lo) : x;
  return x > splat(hi) ? splat(hi) : x;
#endif
}

// 2^x, for the decays: exp(delta * A) = 2^(delta * A log2(e)) with A log2(e)
// taken once per row, so the reduction x = n + r (|r| <= 1/2) is exact and
// needs no Cody-Waite split; 2^r is SLEEF's degree-6 exp2f polynomial (~1 ulp),
// doubled and scaled by 2^(n-1) as in vexp. 14 vector operations against vexp's
// 19 (AVX2, GCC 12, not counting the constants' broadcasts, which loops hoist):
// the decays are N exps per step, the other exps (softplus, silu) one each.
// x < -125.5 gives 0, x >= 128 +inf; NaN stays NaN (vclamp keeps it).
inline vfloat vexp2(vfloat x) {
  x = vclamp(x, -126.f, 128.f);
  const vfloat fx = x + splat(kRoundMagic);  // round to nearest, as in vexp
  const vfloat r = x - (fx - splat(kRoundMagic));
  const vfloat p = horner(r, 2.f * 1.535920892e-4f, 2.f * 1.339262701e-3f, 2.f * 9.618384764e-3f,
                          2.f * 5.550347269e-2f, 2.f * 2.402264476e-1f, 2.f * 6.931471825e-1f, 2.f);
  return p * pow2_minus1(fx);
}

// log1p(y) for y in [0, 1], Cephes logf polynomial. The reduced argument f
// (log1p(y) = e*ln2 + log1p(f)) is exact in both branches: f = y, or
// f = (1 + y)/2 - 1 = (y - 1)/2 for y > sqrt(2) - 1, so small y keep their
// full precision (no 1 + y rounding).
inline vfloat vlog1p_unit(vfloat y) {
  const auto big = y > splat(0.41421356237f);
  const vfloat f = big ? (y - splat(1.f)) * splat(0.5f) : y;
  const vfloat e = big ? splat(1.f) : splat(0.f);
  const vfloat z = f * f;
  const vfloat p = horner(f, 7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f,
                          1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f,
                          3.3333331174e-1f);
  vfloat r = p * f * z + e * splat(-2.12194440e-4f) - splat(0.5f) * z + f;
  return r + e * splat(0.693359375f);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)): never overflows, equals x
// (to the last bit) wherever F.softplus's threshold of 20 returns x.
inline vfloat vsoftplus(vfloat x) {
  const vfloat ax = x < splat(0.f) ? -x : x;
  const vfloat pos = x > splat(0.f) ? x : splat(0.f);
  const vfloat res = pos + vlog1p_unit(vexp(-ax));
  return x != x ? x : res;  // NaN in, NaN out
}


inline float softplus_scalar(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }
inline double softplus_scalar(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

// fp64 (gradcheck, not speed): the same algorithm, libm per lane.
template <typename F>
inline vec_t<double> lanewise(vec_t<double> x, F f) {
  for (int i = 0; i < Vec<double>::kLanes; ++i) x[i] = f(x[i]);
  return x;
}
inline vec_t<double> vexp(vec_t<double> x) { return lanewise(x, [](double v) { return std::exp(v); }); }
inline vec_t<double> vexp2(vec_t<double> x) { return lanewise(x, [](double v) { return std::exp2(v); }); }
inline vec_t<double> vsoftplus(vec_t<double> x) {
  return lanewise(x, [](double v) { return softplus_scalar(v); });
}

// log2(e): A log2(e) turns the decays into vexp2 arguments.
template <typename T>
constexpr T kLog2e = T(1.44269504088896340736);

template <typename T>
inline vec_t<T> vsigmoid(vec_t<T> x) { return splat(T(1)) / (splat(T(1)) + vexp(-x)); }
template <typename T>
inline T sigmoid_scalar(T x) { return T(1) / (T(1) + std::exp(-x)); }

// softplus(x) (as vsoftplus) and its derivative sigmoid(x) from the same
// w = exp(-|x|): sigmoid(x) = (x > 0 ? 1 : w) / (1 + w).
inline void vsoftplus_grad(vfloat x, vfloat* sp, vfloat* dsp) {
  const vfloat ax = x < splat(0.f) ? -x : x;
  const vfloat pos = x > splat(0.f) ? x : splat(0.f);
  const vfloat w = vexp(-ax);
  const vfloat res = pos + vlog1p_unit(w);
  *sp = x != x ? x : res;
  *dsp = (x > splat(0.f) ? splat(1.f) : w) / (splat(1.f) + w);
}
inline void vsoftplus_grad(vec_t<double> x, vec_t<double>* sp, vec_t<double>* dsp) {
  *sp = vsoftplus(x);
  *dsp = vsigmoid<double>(x);
}

template <typename T>
struct ScanArgs {
  const T* u;      // (batch, dim, L)
  const T* delta;  // (batch, dim, L), before bias and softplus
  const T* delta_bias;  // (dim) or nullptr
  bool delta_softplus;
  const T* A;      // (dim, Np), zero-padded
  const T* B;      // variable: (batch, GB, L, Np); invariant: (dim, Np)
  const T* C;      // same as B with GC
  const T* D;      // (dim) or nullptr
  const T* z;      // (batch, dim, L) or nullptr
  T* out;          // (batch, dim, L)
  T* last_state;   // (batch, dim, N) or nullptr
  int64_t dim, L, N, Np;
  bool B_variable, C_variable;
  int64_t GB, GC;
  bool allow_narrow;  // false: the padded wide layout at any N (benchmarks compare the two)
  // Wide layout: the state entering each chunk of chunk_steps() steps, (batch, dim,
  // n_chunks, Np). The forward writes them when set; the backward then recomputes
  // one chunk at a time from them, else the whole row from h = 0 (nullptr).
  T* chunk_states = nullptr;
  // Wide layout with z: the output before the gate, y + D u, (batch, dim, L). The
  // forward writes it when set; the backward then reads it for dz instead of
  // summing <h_t, C_t> again (mamba-ssm's backward takes it from its forward too).
  T* pregate = nullptr;
};

// The state dimension N padded to whole vectors (the padded lanes stay inert).
template <typename T>
inline int64_t padded_state(int64_t N) {
  constexpr int64_t K = Vec<T>::kLanes;
  return (N + K - 1) / K * K;
}

// Steps per chunk of the backward's recompute (a multiple of kBlock): 128 at fp32
// and N <= 16, so a chunk's decays and states take 16 KB instead of 2 x L x Np.
template <typename T>
inline int64_t chunk_steps(int64_t Np) {
  const int64_t steps = kChunkBytes / (2 * Np * int64_t(sizeof(T))) / kBlock * kBlock;
  return std::max(steps, kBlock);
}
template <typename T>
inline int64_t n_chunks(int64_t L, int64_t Np) {
  const int64_t chunk = chunk_steps<T>(Np);
  return (L + chunk - 1) / chunk;
}

// Backward outputs. Per row: du, ddelta, dz. Shared parameters: one slice per
// thread (index tid), summed after the parallel loop.
template <typename T>
struct GradArgs {
  const T* dout;          // (batch, dim, L)
  T *du, *ddelta, *dz;    // (batch, dim, L); dz nullptr without z
  T* dA;                  // (threads, dim, Np)
  T *dB, *dC;             // (threads, batch, G, L, Np) variable, (threads, dim, Np) invariant
  T *dD, *dbias;          // (threads, dim)
  int64_t dB_per_thread, dC_per_thread;
};

// Row pointer and per-step stride of B or C for one (batch, channel).
template <typename T>
inline void bc_row(const T* base, bool variable, int64_t groups, const ScanArgs<T>& a,
                   int64_t b, int64_t d, const T** row, int64_t* stride) {
  if (variable) {
    const int64_t g = d / (a.dim / groups);
    *row = base + (b * groups + g) * a.L * a.Np;
    *stride = a.Np;
  } else {
    *row = base + d * a.Np;
    *stride = 0;  // same coefficients at every step
  }
}

// Where one (batch, channel) row's dB or dC goes in thread tid's buffer
// (stride 0: time-invariant, the row's sum over t goes to one (dim, Np) row).
template <typename T>
inline T* grad_bc_row(T* base, int64_t per_thread, bool variable, int64_t groups,
                      const ScanArgs<T>& a, int tid, int64_t b, int64_t d, int64_t* stride) {
  T* row;
  bc_row<T>(base + tid * per_thread, variable, groups, a, b, d, const_cast<const T**>(&row), stride);
  return row;
}

// delta + bias, then softplus, for n steps; with dsp (backward, softplus on),
// also softplus' = sigmoid at each step.
template <typename T>
inline void delta_steps(const T* delta, T bias, bool softplus, int64_t n, T* dt, T* dsp = nullptr) {
  constexpr int K = Vec<T>::kLanes;
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    const vec_t<T> v = load(delta + i) + splat(bias);
    if (softplus && dsp) {
      vec_t<T> sp, d;
      vsoftplus_grad(v, &sp, &d);
      store(dt + i, sp);
      store(dsp + i, d);
    } else {
      store(dt + i, softplus ? vsoftplus(v) : v);
    }
  }
  for (; i < n; ++i) {
    const T v = delta[i] + bias;
    dt[i] = softplus ? softplus_scalar(v) : v;
    if (softplus && dsp) dsp[i] = sigmoid_scalar(v);
  }
}

// Epilogue over one row: out = (y + D*u) * silu(z), vectorised over t.
template <typename T>
inline void finish_row(const ScanArgs<T>& a, int64_t row, int64_t d) {
  constexpr int K = Vec<T>::kLanes;
  T* y = a.out + row * a.L;
  const T* u = a.u + row * a.L;
  const T* z = a.z ? a.z + row * a.L : nullptr;
  const T Dd = a.D ? a.D[d] : T(0);
  T* pre = z && a.pregate ? a.pregate + row * a.L : nullptr;
  if (!a.D && !z) return;
  int64_t t = 0;
  for (; t + K <= a.L; t += K) {
    vec_t<T> v = load(y + t) + splat(Dd) * load(u + t);
    if (pre) store(pre + t, v);
    if (z) {
      const vec_t<T> zv = load(z + t);
      v = v * zv * vsigmoid<T>(zv);
    }
    store(y + t, v);
  }
  for (; t < a.L; ++t) {
    T v = y[t] + Dd * u[t];
    if (pre) pre[t] = v;
    if (z) v = v * z[t] * sigmoid_scalar(z[t]);
    y[t] = v;
  }
}

// In-register transpose of K float vectors (AVX 8x8, SSE/NEON 4x4): the
// unpack / shuffle / 128-bit-permute ladder, as shuffles of the vector
// extension (GCC >= 12 and Clang spell it __builtin_shufflevector; older GCC,
// e.g. JetPack 5's GCC 9, __builtin_shuffle with a mask vector).
#if defined(__has_builtin) && !defined(EDGEDIAG_GCC_SHUFFLE)
#if __has_builtin(__builtin_shufflevector)
#define EDGEDIAG_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#endif
#endif
#ifndef EDGEDIAG_SHUFFLE
#define EDGEDIAG_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vint{__VA_ARGS__})
#endif
inline void transpose(vfloat* r) {
#if defined(__AVX__)
  vfloat t[8], q[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = EDGEDIAG_SHUFFLE(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * i + 1] = EDGEDIAG_SHUFFLE(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {
    const vfloat *a = t + 4 * i, *b = t + 4 * i + 2;
    q[4 * i] = EDGEDIAG_SHUFFLE(a[0], b[0], 0, 1, 8, 9, 4, 5, 12, 13);
    q[4 * i + 1] = EDGEDIAG_SHUFFLE(a[0], b[0], 2, 3, 10, 11, 6, 7, 14, 15);
    q[4 * i + 2] = EDGEDIAG_SHUFFLE(a[1], b[1], 0, 1, 8, 9, 4, 5, 12, 13);
    q[4 * i + 3] = EDGEDIAG_SHUFFLE(a[1], b[1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = EDGEDIAG_SHUFFLE(q[i], q[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = EDGEDIAG_SHUFFLE(q[i], q[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
#else
  const vfloat t0 = EDGEDIAG_SHUFFLE(r[0], r[1], 0, 4, 1, 5), t1 = EDGEDIAG_SHUFFLE(r[0], r[1], 2, 6, 3, 7);
  const vfloat t2 = EDGEDIAG_SHUFFLE(r[2], r[3], 0, 4, 1, 5), t3 = EDGEDIAG_SHUFFLE(r[2], r[3], 2, 6, 3, 7);
  r[0] = EDGEDIAG_SHUFFLE(t0, t2, 0, 1, 4, 5);
  r[1] = EDGEDIAG_SHUFFLE(t0, t2, 2, 3, 6, 7);
  r[2] = EDGEDIAG_SHUFFLE(t1, t3, 0, 1, 4, 5);
  r[3] = EDGEDIAG_SHUFFLE(t1, t3, 2, 3, 6, 7);
#endif
}
// fp64 is for gradcheck, not speed: element by element.
inline void transpose(vec_t<double>* r) {
  constexpr int K = Vec<double>::kLanes;
  for (int i = 0; i < K; ++i)
    for (int j = i + 1; j < K; ++j) std::swap(r[i][j], r[j][i]);
}

// Lane i of the result: the sum of r[i]'s lanes, for K vectors, by pairwise
// horizontal adds (K - 1 adds, 2(K - 1) shuffles: 21 operations for eight sums
// with AVX, against 31 for a transpose and seven adds).
inline vfloat hsums(const vfloat* r) {
#if defined(__AVX__)
  auto hadd = [](vfloat a, vfloat b) {  // [a01 a23 b01 b23 | a45 a67 b45 b67]
    return EDGEDIAG_SHUFFLE(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + EDGEDIAG_SHUFFLE(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const vfloat lo = hadd(hadd(r[0], r[1]), hadd(r[2], r[3]));  // halves of r0..r3's sums
  const vfloat hi = hadd(hadd(r[4], r[5]), hadd(r[6], r[7]));
  return EDGEDIAG_SHUFFLE(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + EDGEDIAG_SHUFFLE(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
#else
  auto hadd = [](vfloat a, vfloat b) {  // [a01 a23 b01 b23]
    return EDGEDIAG_SHUFFLE(a, b, 0, 2, 4, 6) + EDGEDIAG_SHUFFLE(a, b, 1, 3, 5, 7);
  };
  return hadd(hadd(r[0], r[1]), hadd(r[2], r[3]));
#endif
}
// fp64 is for gradcheck, not speed.
inline vec_t<double> hsums(const vec_t<double>* r) {
  vec_t<double> s;
  for (int i = 0; i < Vec<double>::kLanes; ++i) s[i] = hsum<double>(r[i]);
  return s;
}

// out[i] = hsum(acc[i]) for i < n, K sums at a time.
template <typename T>
inline void store_hsums(const vec_t<T>* acc, int64_t n, T* out) {
  constexpr int K = Vec<T>::kLanes;
  int64_t i = 0;
  for (; i + K <= n; i += K) store(out + i, hsums(acc + i));
  for (; i < n; ++i) out[i] = hsum<T>(acc[i]);
}

// ------------------------------------------------------------------ wide layout

// The recurrence over one block for NV (1 or 2) vector slices of the state, in
// registers: the slices' chains advance together (two independent multiply-adds
// per step), and each step's partial <h_t, C_t> is summed over them before it
// touches the block's buffer (written by the first slices, added to by the rest).
template <typename T, int NV>
inline void scan_slices(int64_t tb, const T* Ad, const T* Bj, int64_t Bs, const T* Cj, int64_t Cs,
                        const T* dtb, const T* du, T* state, vec_t<T>* acc, bool first) {
  using V = vec_t<T>;
  constexpr int K = Vec<T>::kLanes;
  V A2[NV], h[NV];
  for (int j = 0; j < NV; ++j) {
    A2[j] = load(Ad + j * K) * splat(kLog2e<T>);
    h[j] = load(state + j * K);
  }
  for (int64_t t = 0; t < tb; ++t) {
    const V dtv = splat(dtb[t]), duv = splat(du[t]);
    V y = splat(T(0));
    for (int j = 0; j < NV; ++j) {
      h[j] = vexp2(dtv * A2[j]) * h[j] + duv * load(Bj + t * Bs + j * K);
      y += h[j] * load(Cj + t * Cs + j * K);
    }
    acc[t] = first ? y : acc[t] + y;
  }
  for (int j = 0; j < NV; ++j) store(state + j * K, h[j]);
}

// Forward of one (batch, channel) row.
template <typename T>
void scan_row(const ScanArgs<T>& a, int64_t b, int64_t d) {
  using V = vec_t<T>;
  constexpr int K = Vec<T>::kLanes;
  const int64_t nv = a.Np / K;
  const int64_t row = b * a.dim + d;
  const T* u = a.u + row * a.L;
  const T* delta = a.delta + row * a.L;
  const T bias = a.delta_bias ? a.delta_bias[d] : T(0);
  const T* Ad = a.A + d * a.Np;
  T* y = a.out + row * a.L;
  const T *Brow, *Crow;
  int64_t Bs, Cs;
  bc_row(a.B, a.B_variable, a.GB, a, b, d, &Brow, &Bs);
  bc_row(a.C, a.C_variable, a.GC, a, b, d, &Crow, &Cs);

  std::vector<T> state(a.Np, T(0));  // h between blocks
  alignas(64) T dtb[kBlock];         // delta after bias and softplus
  T du[kBlock];                      // delta * u
  V acc[kBlock];                     // per step: lanes of <h_t, C_t>
  static_assert(kBlock % 8 == 0, "blocks are whole vectors");
  const int64_t chunk = chunk_steps<T>(a.Np);
  T* saved = a.chunk_states ? a.chunk_states + row * n_chunks<T>(a.L, a.Np) * a.Np : nullptr;
  for (int64_t t0 = 0; t0 < a.L; t0 += kBlock) {
    const int64_t tb = std::min(kBlock, a.L - t0);
    if (saved && t0 % chunk == 0) std::memcpy(saved + t0 / chunk * a.Np, state.data(), a.Np * sizeof(T));
    delta_steps(delta + t0, bias, a.delta_softplus, tb, dtb);
    for (int64_t i = 0; i < tb; ++i) du[i] = dtb[i] * u[t0 + i];
    for (int64_t j = 0; j < nv; j += 2)
      (nv - j >= 2 ? scan_slices<T, 2> : scan_slices<T, 1>)(tb, Ad + j * K, Brow + t0 * Bs + j * K, Bs,
                                                          Crow + t0 * Cs + j * K, Cs, dtb, du,
                                                          state.data() + j * K, acc, j == 0);
    store_hsums<T>(acc, tb, y + t0);
  }
  if (a.last_state) std::memcpy(a.last_state + row * a.N, state.data(), a.N * sizeof(T));
  finish_row(a, row, d);
}

// Per-thread scratch of the backward, reused across the rows of a task.
template <typename T>
struct RowScratch {
  std::vector<T> H, E;           // states and decays dA_t of one chunk: (1 + steps) x Np, steps x Np
  std::vector<T> dt, dtu, g;     // delta after softplus; delta * u; dout * silu(z)
  std::vector<T> dsp, sigz;      // softplus'(delta + bias); sigmoid(z)
  std::vector<T> carry;          // adjoint state between blocks (Np)
  std::vector<T> dBsum, dCsum;   // time-invariant B/C: the row's sums over t (Np)
};

// The elementwise part of the backward for n steps of one row, given the sums
// over the state of x_t*e_t*h_{t-1}*A (sA), x_t*B_t (sB) and h_t*C_t (y):
// ddelta_t = (sA + u_t sB) * softplus'(delta_t + bias), du_t = delta_t sB + D g_t,
// dz_t = dout_t (y_t + D u_t) silu'(z_t); dD and dbias summed. dsp (softplus')
// and sigz (sigmoid(z)) come from the recompute; nullptr without softplus / z.
// y + Dy u is the output before the gate: Dy = D for the summed y, 0 for the
// forward's saved pre-gate output.
template <typename T>
inline void block_grads(int64_t n, const T* u, const T* z, const T* sigz, const T* dout, const T* dt,
                        const T* dsp, const T* gt, const T* sA, const T* sB, const T* y, T Dy, T Dd, T* du,
                        T* ddelta, T* dz, T* dD, T* dbias) {
  using V = vec_t<T>;
  constexpr int K = Vec<T>::kLanes;
  V dDv = splat(T(0)), dbv = splat(T(0));
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    const V uv = load(u + i), sBv = load(sB + i), gv = load(gt + i);
    const V ddt = load(sA + i) + uv * sBv;
    store(du + i, load(dt + i) * sBv + splat(Dd) * gv);
    dDv += gv * uv;
    if (z) {
      const V zv = load(z + i), sig = load(sigz + i);
      store(dz + i, load(dout + i) * (load(y + i) + splat(Dy) * uv) * sig * (splat(T(1)) + zv * (splat(T(1)) - sig)));
    }
    const V dd = dsp ? ddt * load(dsp + i) : ddt;
    store(ddelta + i, dd);
    dbv += dd;
  }
  T dDs = hsum<T>(dDv), dbs = hsum<T>(dbv);
  for (; i < n; ++i) {
    const T ddt = sA[i] + u[i] * sB[i];
    du[i] = dt[i] * sB[i] + Dd * gt[i];
    dDs += gt[i] * u[i];
    if (z) dz[i] = dout[i] * (y[i] + Dy * u[i]) * sigz[i] * (T(1) + z[i] * (T(1) - sigz[i]));
    const T dd = dsp ? ddt * dsp[i] : ddt;
    ddelta[i] = dd;
    dbs += dd;
  }
  *dD += dDs;
  *dbias += dbs;
}

// The adjoint recurrence over one block of steps for NV (1 or 2) vector slices
// of the state starting at lane o0, in registers: the slices advance together
// step by step, so their recurrences overlap. The per-step partial sums over the
// state go to accA, accB, accY (set by the first slice, added to by the others)
// and are reduced across lanes once per block (store_hsums), not once per step.
// BVAR / CVAR: B / C vary in time, so dB / dC are per step (read-modify-write
// of the group's rows) rather than summed in registers. YSUM: sum y_t = <h_t, C_t>
// too (for dz, when the forward's pre-gate output is not at hand).
template <typename T, int NV, bool BVAR, bool CVAR, bool YSUM>
inline void adjoint_block(int64_t t0, int64_t tb, int64_t c0, int64_t o0, int64_t Np, const T* Ad, const T* H,
                          const T* E, const T* Brow, int64_t Bs, const T* Crow, int64_t Cs, T* dBrow,
                          int64_t dBs, T* dCrow, int64_t dCs, const T* dt, const T* dtu, const T* gt,
                          RowScratch<T>& s, T* dA, bool first, vec_t<T>* accA, vec_t<T>* accB,
                          vec_t<T>* accY) {
  using V = vec_t<T>;
  constexpr int K = Vec<T>::kLanes;
  Ad += o0, H += o0, E += o0, Brow += o0, Crow += o0, dA += o0;
  if (BVAR) dBrow += o0;
  if (CVAR) dCrow += o0;
  T* carry = s.carry.data() + o0;
  T* dBsum = s.dBsum.data() + o0;
  T* dCsum = s.dCsum.data() + o0;
  V Aj[NV], x[NV], dAj[NV], dBj[NV], dCj[NV], hp[NV];
  for (int j = 0; j < NV; ++j) {
    Aj[j] = load(Ad + j * K);
    x[j] = load(carry + j * K);  // dA_{t+1} * x_{t+1}
    dAj[j] = dBj[j] = dCj[j] = splat(T(0));
    hp[j] = load(H + (t0 - c0 + tb - 1) * Np + j * K);
  }
  for (int64_t i = tb - 1; i >= 0; --i) {
    const int64_t t = t0 + i;
    const V gv = splat(gt[t]), dtv = splat(dt[t]), dtuv = splat(dtu[t]);
    V sA = splat(T(0)), sB = splat(T(0)), sY = splat(T(0));
    for (int j = 0; j < NV; ++j) {
      const int64_t o = j * K;
      const V Ct = load(Crow + t * Cs + o), Bt = load(Brow + t * Bs + o);
      const V h = hp[j], e = load(E + (t - c0) * Np + o);
      hp[j] = load(H + (t - c0 - 1) * Np + o);  // h_{t-1}, the next step's h_t (at c0: the chunk's entry)
      const V xt = x[j] + gv * Ct;  // dLoss/dh_t
      if (YSUM) sY += h * Ct;
      sB += xt * Bt;
      const V sv = xt * e * hp[j];  // dLoss/d(dA_t) * dA_t
      sA += sv * Aj[j];
      dAj[j] += sv * dtv;
      const V xdu = xt * dtuv;
      if (BVAR) store(dBrow + t * dBs + o, load(dBrow + t * dBs + o) + xdu); else dBj[j] += xdu;
      if (CVAR) store(dCrow + t * dCs + o, load(dCrow + t * dCs + o) + gv * h); else dCj[j] += gv * h;
      x[j] = e * xt;
    }
    accA[i] = first ? sA : accA[i] + sA;
    accB[i] = first ? sB : accB[i] + sB;
    if (YSUM) accY[i] = first ? sY : accY[i] + sY;
  }
  for (int j = 0; j < NV; ++j) {
    const int64_t o = j * K;
    store(carry + o, x[j]);
    store(dA + o, load(dA + o) + dAj[j]);
    if (!BVAR) store(dBsum + o, load(dBsum + o) + dBj[j]);
    if (!CVAR) store(dCsum + o, load(dCsum + o) + dCj[j]);
  }
}

// The adjoint over one block for every slice of the state, two vectors at a
// time (the registers hold two: x, h, dA, dB, dC each).
template <typename T, bool BVAR, bool CVAR, bool YSUM>
inline void adjoint_slices(int64_t t0, int64_t tb, int64_t c0, int64_t nv, int64_t Np, const T* Ad, const T* H,
                           const T* E, const T* Brow, int64_t Bs, const T* Crow, int64_t Cs, T* dBrow,
                           int64_t dBs, T* dCrow, int64_t dCs, const T* dt, const T* dtu, const T* gt,
                           RowScratch<T>& s, T* dA, vec_t<T>* accA, vec_t<T>* accB, vec_t<T>* accY) {
  constexpr int K = Vec<T>::kLanes;
  for (int64_t j = 0; j < nv; j += 2) {
    (nv - j >= 2 ? adjoint_block<T, 2, BVAR, CVAR, YSUM> : adjoint_block<T, 1, BVAR, CVAR, YSUM>)(
        t0, tb, c0, j * K, Np, Ad, H, E, Brow, Bs, Crow, Cs, dBrow, dBs, dCrow, dCs, dt, dtu, gt, s, dA, j == 0,
        accA, accB, accY);
  }
}

// Backward of one (batch, channel) row, chunk by chunk from the last: recompute
// the chunk's h_t from the state the forward saved at its start (a.chunk_states;
// without them the whole row is one chunk from h = 0), then run the adjoint
// recurrence back over its blocks. A chunk's states stay in L1, where a row's
// (L x Np each for h and dA) would not: mamba-ssm's CUDA backward does the same.
template <typename T>
void scan_row_bwd(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t b, int64_t d, int tid,
                  RowScratch<T>& s) {
  using V = vec_t<T>;
  constexpr int K = Vec<T>::kLanes;
  const int64_t L = a.L, Np = a.Np, nv = Np / K;
  const int64_t row = b * a.dim + d;
  const T* u = a.u + row * L;
  const T* delta = a.delta + row * L;
  const T* z = a.z ? a.z + row * L : nullptr;
  const T* dout = g.dout + row * L;
  const T bias = a.delta_bias ? a.delta_bias[d] : T(0);
  const T Dd = a.D ? a.D[d] : T(0);
  const T* Ad = a.A + d * Np;
  const T *Brow, *Crow;
  int64_t Bs, Cs, dBs, dCs;
  bc_row(a.B, a.B_variable, a.GB, a, b, d, &Brow, &Bs);
  bc_row(a.C, a.C_variable, a.GC, a, b, d, &Crow, &Cs);
  T* dBrow = grad_bc_row(g.dB, g.dB_per_thread, a.B_variable, a.GB, a, tid, b, d, &dBs);
  T* dCrow = grad_bc_row(g.dC, g.dC_per_thread, a.C_variable, a.GC, a, tid, b, d, &dCs);
  T* dA = g.dA + (tid * a.dim + d) * Np;

  const int64_t chunk = a.chunk_states ? chunk_steps<T>(Np) : L;
  const int64_t chunks = (L + chunk - 1) / chunk;
  const T* saved = a.chunk_states ? a.chunk_states + row * chunks * Np : nullptr;
  s.H.resize((std::min(chunk, L) + 1) * Np);  // first row: the state entering the chunk
  s.E.resize(std::min(chunk, L) * Np);
  s.dt.resize(L);
  s.dtu.resize(L);
  s.g.resize(L);
  if (a.delta_softplus) s.dsp.resize(L);
  if (z) s.sigz.resize(L);
  s.carry.assign(Np, T(0));
  s.dBsum.assign(Np, T(0));
  s.dCsum.assign(Np, T(0));
  T *H = s.H.data() + Np, *E = s.E.data(), *dt = s.dt.data(), *dtu = s.dtu.data(), *gt = s.g.data();
  T* dsp = a.delta_softplus ? s.dsp.data() : nullptr;
  T* sigz = z ? s.sigz.data() : nullptr;

  // 1. the row's steps: delta after softplus, delta * u, the gate
  delta_steps(delta, bias, a.delta_softplus, L, dt, dsp);
  for (int64_t t = 0; t < L; ++t) dtu[t] = dt[t] * u[t];
  {
    int64_t t = 0;
    if (z) {
      for (; t + K <= L; t += K) {
        const V zv = load(z + t), sig = vsigmoid<T>(zv);
        store(sigz + t, sig);
        store(gt + t, load(dout + t) * zv * sig);
      }
    }
    for (; t < L; ++t) {
      if (z) sigz[t] = sigmoid_scalar(z[t]);
      gt[t] = z ? dout[t] * z[t] * sigz[t] : dout[t];
    }
  }

  // 2. per chunk from the last: its decays and states, then the adjoint over its blocks
  T dD = 0, dbias = 0;
  // y, the output before the gate, is needed for dz only: from the forward when it saved it
  const T* pre = z && a.pregate ? a.pregate + row * L : nullptr;
  const bool ysum = z && !pre;
  using Adjoint = decltype(&adjoint_slices<T, true, true, true>);
  static constexpr Adjoint kAdjoint[2][2][2] = {
      {{adjoint_slices<T, false, false, false>, adjoint_slices<T, false, false, true>},
       {adjoint_slices<T, false, true, false>, adjoint_slices<T, false, true, true>}},
      {{adjoint_slices<T, true, false, false>, adjoint_slices<T, true, false, true>},
       {adjoint_slices<T, true, true, false>, adjoint_slices<T, true, true, true>}}};
  const Adjoint adjoint = kAdjoint[dBs != 0][dCs != 0][ysum];
  for (int64_t c0 = (chunks - 1) * chunk; c0 >= 0; c0 -= chunk) {
    const int64_t tc = std::min(chunk, L - c0);
    if (saved) std::memcpy(H - Np, saved + c0 / chunk * Np, Np * sizeof(T));
    else std::fill(H - Np, H, T(0));
    for (int64_t j = 0; j < nv; ++j) {
      const V A2 = load(Ad + j * K) * splat(kLog2e<T>);
      V h = load(H - Np + j * K);
      for (int64_t i = 0; i < tc; ++i) {
        const int64_t t = c0 + i;
        const V e = vexp2(splat(dt[t]) * A2);
        h = e * h + splat(dtu[t]) * load(Brow + t * Bs + j * K);
        store(E + i * Np + j * K, e);
        store(H + i * Np + j * K, h);
      }
    }
    for (int64_t t0 = c0 + (tc - 1) / kBlock * kBlock; t0 >= c0; t0 -= kBlock) {
      const int64_t tb = std::min(kBlock, c0 + tc - t0);
      alignas(64) T sA[kBlock], sB[kBlock], y[kBlock];
      alignas(64) V accA[kBlock], accB[kBlock], accY[kBlock];  // per step, lanes of the three sums
      adjoint(t0, tb, c0, nv, Np, Ad, H, E, Brow, Bs, Crow, Cs, dBrow, dBs, dCrow, dCs, dt, dtu, gt, s, dA,
              accA, accB, accY);
      store_hsums<T>(accA, tb, sA);
      store_hsums<T>(accB, tb, sB);
      if (ysum) store_hsums<T>(accY, tb, y);
      // per step, the elementwise chain rule vectorised over t (y is read only for dz)
      block_grads<T>(tb, u + t0, z ? z + t0 : nullptr, z ? sigz + t0 : nullptr, dout + t0, dt + t0,
                     dsp ? dsp + t0 : nullptr, gt + t0, sA, sB, pre ? pre + t0 : y, pre ? T(0) : Dd, Dd,
                     g.du + row * L + t0, g.ddelta + row * L + t0, z ? g.dz + row * L + t0 : nullptr, &dD,
                     &dbias);
    }
  }
  if (!dBs) for (int64_t n = 0; n < Np; ++n) dBrow[n] += s.dBsum[n];
  if (!dCs) for (int64_t n = 0; n < Np; ++n) dCrow[n] += s.dCsum[n];
  g.dD[tid * a.dim + d] += dD;
  g.dbias[tid * a.dim + d] += dbias;
}

// ---------------------------------------------------------------- narrow layout
// kLanes channels d0..d0+K-1 of one batch item, all in the same B/C group (or
// B/C time-invariant), lanes across channels, N <= kMaxNarrowN states each.

constexpr int64_t kMaxNarrowN = 4;

// (K rows of length L, row stride ld) <-> time-major (L, K), K steps at a time.
template <typename T>
inline void to_time_major(const T* rows, int64_t L, T* tm) {
  constexpr int K = Vec<T>::kLanes;
  int64_t t = 0;
  for (; t + K <= L; t += K) {
    vec_t<T> r[K];
    for (int c = 0; c < K; ++c) r[c] = load(rows + c * L + t);
    transpose(r);
    for (int i = 0; i < K; ++i) store(tm + (t + i) * K, r[i]);
  }
  for (; t < L; ++t)
    for (int c = 0; c < K; ++c) tm[t * K + c] = rows[c * L + t];
}
template <typename T>
inline void from_time_major(const T* tm, int64_t L, T* rows) {
  constexpr int K = Vec<T>::kLanes;
  int64_t t = 0;
  for (; t + K <= L; t += K) {
    vec_t<T> r[K];
    for (int i = 0; i < K; ++i) r[i] = load(tm + (t + i) * K);
    transpose(r);
    for (int c = 0; c < K; ++c) store(rows + c * L + t, r[c]);
  }
  for (; t < L; ++t)
    for (int c = 0; c < K; ++c) rows[c * L + t] = tm[t * K + c];
}

// B or C of step t, state n, for the K channels of the task: one broadcast
// value (variable: the group's coefficient) or a per-channel vector (invariant).
template <typename T>
struct NarrowBC {
  const T* row;               // variable: (L, Np) rows of the group
  vec_t<T> inv[kMaxNarrowN];  // invariant: per-channel coefficients
  bool variable;
  int64_t Np;
  inline vec_t<T> at(int64_t t, int64_t n) const { return variable ? splat(row[t * Np + n]) : inv[n]; }
};

template <typename T>
NarrowBC<T> narrow_bc(const T* base, bool variable, int64_t groups, const ScanArgs<T>& a, int64_t b,
                      int64_t d0) {
  NarrowBC<T> bc;
  bc.variable = variable;
  bc.Np = a.Np;
  int64_t stride;
  bc_row(base, variable, groups, a, b, d0, &bc.row, &stride);
  if (!variable)
    for (int64_t n = 0; n < a.N; ++n)
      for (int c = 0; c < Vec<T>::kLanes; ++c) bc.inv[n][c] = base[(d0 + c) * a.Np + n];
  return bc;
}

template <typename T>
struct NarrowScratch {
  std::vector<T> u, dt, z, y, dout, delta;  // time-major (L, K)
  std::vector<vec_t<T>> H, E;                // (L, N) state vectors
};

// Per-channel vectors of A and the scalars D, bias for the task's channels.
template <typename T>
inline void narrow_params(const ScanArgs<T>& a, int64_t d0, vec_t<T>* An, vec_t<T>* Dv, vec_t<T>* bv) {
  for (int c = 0; c < Vec<T>::kLanes; ++c) {
    for (int64_t n = 0; n < a.N; ++n) An[n][c] = a.A[(d0 + c) * a.Np + n];
    (*Dv)[c] = a.D ? a.D[d0 + c] : T(0);
    (*bv)[c] = a.delta_bias ? a.delta_bias[d0 + c] : T(0);
  }
}

// delta (time-major, in place) + bias, softplus.
template <typename T>
inline void narrow_delta(T* dt, int64_t L, vec_t<T> bias, bool softplus) {
  constexpr int K = Vec<T>::kLanes;
  for (int64_t t = 0; t < L; ++t) {
    const vec_t<T> v = load(dt + t * K) + bias;
    store(dt + t * K, softplus ? vsoftplus(v) : v);
  }
}

// Forward of K channels, K steps at a time: each tile of u, delta and z is
// transposed in registers (lanes = channels), scanned, and the outputs are
// transposed back into the rows; nothing else touches memory.
template <typename T>
void scan_narrow(const ScanArgs<T>& a, int64_t b, int64_t d0, NarrowScratch<T>& s) {
  using V = vec_t<T>;
  constexpr int K = Vec<T>::kLanes;
  const int64_t L = a.L, N = a.N, row0 = b * a.dim + d0;
  V An[kMaxNarrowN], Dv, bv;
  narrow_params(a, d0, An, &Dv, &bv);
  V A2n[kMaxNarrowN];
  for (int64_t n = 0; n < a.N; ++n) A2n[n] = An[n] * splat(kLog2e<T>);
  const NarrowBC<T> Bc = narrow_bc(a.B, a.B_variable, a.GB, a, b, d0);
  const NarrowBC<T> Cc = narrow_bc(a.C, a.C_variable, a.GC, a, b, d0);
  const T* u = a.u + row0 * L;
  const T* delta = a.delta + row0 * L;
  const T* z = a.z ? a.z + row0 * L : nullptr;
  T* out = a.out + row0 * L;
  // a last partial tile goes through a zero-padded copy (K rows of K steps)
  s.u.assign(3 * K * K, T(0));
  s.y.resize(K * K);
  V h[kMaxNarrowN];
  for (int64_t n = 0; n < N; ++n) h[n] = splat(T(0));
  for (int64_t t0 = 0; t0 < L; t0 += K) {
    const int64_t tb = std::min<int64_t>(K, L - t0);
    const T *ur = u + t0, *dr = delta + t0, *zr = z ? z + t0 : nullptr;
    int64_t ld = L;
    if (tb < K) {
      T* pad = s.u.data();
      for (int c = 0; c < K; ++c)
        for (int64_t i = 0; i < tb; ++i) {
          pad[c * K + i] = ur[c * L + i];
          pad[K * K + c * K + i] = dr[c * L + i];
          if (z) pad[2 * K * K + c * K + i] = zr[c * L + i];
        }
      ur = pad, dr = pad + K * K, zr = z ? pad + 2 * K * K : nullptr, ld = K;
    }
    V ut[K], dtt[K], zt[K];
    for (int c = 0; c < K; ++c) {
      ut[c] = load(ur + c * ld);
      dtt[c] = load(dr + c * ld);
      if (z) zt[c] = load(zr + c * ld);
    }
    transpose(ut);
    transpose(dtt);
    if (z) transpose(zt);
    // three passes over the tile: the independent softplus and silu of its K
    // steps overlap each other instead of queuing behind the recurrence
    for (int i = 0; i < K; ++i) {
      const V v = dtt[i] + bv;
      dtt[i] = a.delta_softplus ? vsoftplus(v) : v;
    }
    for (int64_t i = 0; i < tb; ++i) {
      const V du = dtt[i] * ut[i];
      V y = Dv * ut[i];
      for (int64_t n = 0; n < N; ++n) {
        h[n] = vexp2(dtt[i] * A2n[n]) * h[n] + du * Bc.at(t0 + i, n);
        y += h[n] * Cc.at(t0 + i, n);
      }
      ut[i] = y;
    }
    if (z)  // the epilogue: (y + D*u) * silu(z)
      for (int i = 0; i < K; ++i) ut[i] = ut[i] * zt[i] * vsigmoid<T>(zt[i]);
    transpose(ut);
    if (tb == K) {
      for (int c = 0; c < K; ++c) store(out + c * L + t0, ut[c]);
    } else {
      for (int c = 0; c < K; ++c) {
        store(s.y.data() + c * K, ut[c]);
        for (int64_t i = 0; i < tb; ++i) out[c * L + t0 + i] = s.y[c * K + i];
      }
    }
  }
  if (a.last_state)
    for (int c = 0; c < K; ++c)
      for (int64_t n = 0; n < N; ++n) a.last_state[(row0 + c) * N + n] = h[n][c];
}

template <typename T>
void scan_narrow_bwd(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t b, int64_t d0, int tid,
                     NarrowScratch<T>& s) {
  using V = vec_t<T>;
  constexpr int K = Vec<T>::kLanes;
  const int64_t L = a.L, N = a.N, Np = a.Np, row0 = b * a.dim + d0;
  s.u.resize(L * K);
  s.dt.resize(L * K);
  s.delta.resize(L * K);
  s.dout.resize(L * K);
  s.y.resize(L * K);
  s.H.resize(L * N);
  s.E.resize(L * N);
  to_time_major(a.u + row0 * L, L, s.u.data());
  to_time_major(a.delta + row0 * L, L, s.delta.data());
  to_time_major(g.dout + row0 * L, L, s.dout.data());
  if (a.z) {
    s.z.resize(L * K);
    to_time_major(a.z + row0 * L, L, s.z.data());
  }
  V An[kMaxNarrowN], Dv, bv;
  narrow_params(a, d0, An, &Dv, &bv);
  V A2n[kMaxNarrowN];
  for (int64_t n = 0; n < a.N; ++n) A2n[n] = An[n] * splat(kLog2e<T>);
  std::copy(s.delta.begin(), s.delta.end(), s.dt.begin());
  narrow_delta(s.dt.data(), L, bv, a.delta_softplus);
  const NarrowBC<T> Bc = narrow_bc(a.B, a.B_variable, a.GB, a, b, d0);
  const NarrowBC<T> Cc = narrow_bc(a.C, a.C_variable, a.GC, a, b, d0);
  int64_t dBs, dCs;
  T* dBrow = grad_bc_row(g.dB, g.dB_per_thread, a.B_variable, a.GB, a, tid, b, d0, &dBs);
  T* dCrow = grad_bc_row(g.dC, g.dC_per_thread, a.C_variable, a.GC, a, tid, b, d0, &dCs);

  // 1. recompute the states
  {
    V h[kMaxNarrowN];
    for (int64_t n = 0; n < N; ++n) h[n] = splat(T(0));
    for (int64_t t = 0; t < L; ++t) {
      const V dt = load(s.dt.data() + t * K);
      const V du = dt * load(s.u.data() + t * K);
      for (int64_t n = 0; n < N; ++n) {
        const V e = vexp2(dt * A2n[n]);
        h[n] = e * h[n] + du * Bc.at(t, n);
        s.E[t * N + n] = e;
        s.H[t * N + n] = h[n];
      }
    }
  }
  // 2. adjoint recurrence; s.u/s.dt/s.delta/s.dout/s.z are overwritten step by
  // step with du / ddelta / (unused) / (unused) / dz once read.
  V x[kMaxNarrowN], dAn[kMaxNarrowN], dBn[kMaxNarrowN], dCn[kMaxNarrowN];
  for (int64_t n = 0; n < N; ++n) x[n] = dAn[n] = dBn[n] = dCn[n] = splat(T(0));
  V dD = splat(T(0)), dbias = splat(T(0));
  for (int64_t t = L - 1; t >= 0; --t) {
    const V uv = load(s.u.data() + t * K), dt = load(s.dt.data() + t * K);
    const V dout = load(s.dout.data() + t * K);
    V zv = splat(T(0)), sigz = splat(T(0));
    V gv = dout;
    if (a.z) {
      zv = load(s.z.data() + t * K);
      sigz = vsigmoid<T>(zv);
      gv = dout * zv * sigz;
    }
    const V du = dt * uv;
    V sA = splat(T(0)), sB = splat(T(0)), y = splat(T(0));
    for (int64_t n = 0; n < N; ++n) {
      const V Ct = Cc.at(t, n), Bt = Bc.at(t, n);
      const V h = s.H[t * N + n], e = s.E[t * N + n];
      const V hp = t > 0 ? s.H[(t - 1) * N + n] : splat(T(0));
      const V xt = x[n] + gv * Ct;
      y += h * Ct;
      sB += xt * Bt;
      const V sv = xt * e * hp;
      sA += sv * An[n];
      dAn[n] += sv * dt;
      // a group's B/C are shared by its channels: their gradients sum over the lanes
      if (dBs) dBrow[t * dBs + n] += hsum<T>(xt * du); else dBn[n] += xt * du;
      if (dCs) dCrow[t * dCs + n] += hsum<T>(gv * h); else dCn[n] += gv * h;
      x[n] = e * xt;
    }
    const V ddt = sA + uv * sB;
    store(s.u.data() + t * K, dt * sB + Dv * gv);  // du
    dD += gv * uv;
    if (a.z) store(s.z.data() + t * K, dout * (y + Dv * uv) * sigz * (splat(T(1)) + zv * (splat(T(1)) - sigz)));
    const V ddelta = a.delta_softplus ? ddt * vsigmoid<T>(load(s.delta.data() + t * K) + bv) : ddt;
    store(s.dt.data() + t * K, ddelta);
    dbias += ddelta;
  }
  from_time_major(s.u.data(), L, g.du + row0 * L);
  from_time_major(s.dt.data(), L, g.ddelta + row0 * L);
  if (a.z) from_time_major(s.z.data(), L, g.dz + row0 * L);
  for (int c = 0; c < K; ++c) {
    const int64_t d = d0 + c;
    for (int64_t n = 0; n < N; ++n) {
      g.dA[(tid * a.dim + d) * Np + n] += dAn[n][c];
      if (!dBs) g.dB[tid * g.dB_per_thread + d * Np + n] += dBn[n][c];
      if (!dCs) g.dC[tid * g.dC_per_thread + d * Np + n] += dCn[n][c];
    }
    g.dD[tid * a.dim + d] += dD[c];
    g.dbias[tid * a.dim + d] += dbias[c];
  }
}

// Narrow when the state is small and every task's K channels share one B/C group.
template <typename T>
bool use_narrow(const ScanArgs<T>& a) {
  constexpr int K = Vec<T>::kLanes;
  if (!a.allow_narrow || a.N > kMaxNarrowN || a.dim % K) return false;
  if (a.B_variable && (a.dim / a.GB) % K) return false;
  if (a.C_variable && (a.dim / a.GC) % K) return false;
  return true;
}


}  // namespace edgediag_scan
