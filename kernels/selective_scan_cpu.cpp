// Selective scan (Mamba S6) forward for CPU inference.
//
// Semantics are those of mamba-ssm's selective_scan_ref:
//   dA_t = exp(delta_t * A),  h_t = dA_t * h_{t-1} + delta_t * u_t * B_t,
//   y_t = <h_t, C_t> + D * u_t,  out_t = y_t * silu(z_t),  all in fp32.
//
// Work split: one task per (batch, channel) row, rows spread over the
// intra-op threads with at::parallel_for. Within a row, time is cut into
// blocks of kBlock steps; for each 8-wide slice of the state dimension N the
// recurrence runs over the block with that slice held in one register, and
// the partial <h_t, C_t> of every step is accumulated in a small L1 buffer.
// The vectors are GCC/Clang vector extensions, 8 floats with AVX and 4
// otherwise: the same source compiles to AVX2 (the loader adds -mavx2 -mfma
// when the CPU has them), to SSE on older x86 and to NEON on aarch64 (Jetson);
// no -march=native.
// exp() is a branch-free Cephes-style polynomial on those vectors: the
// D*N*L exps dominate the cost, and the only loop-carried dependency per
// step is one multiply-add, so the exps of later steps overlap it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

// One vector = one native register: 8 floats with AVX, 4 with SSE / NEON
// (wider generic vectors get split into pairs and run several times slower).
#if defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Broadcast. (An explicit initialiser: `vfloat{} + x` would cost a real add,
// as x + 0 is not an identity for x = -0.)
template <size_t... I>
inline vfloat splat_impl(float x, std::index_sequence<I...>) {
  return vfloat{((void)I, x)...};
}
inline vfloat splat(float x) { return splat_impl(x, std::make_index_sequence<kLanes>{}); }

// memcpy keeps unaligned loads/stores well-defined; compilers emit plain
// vector moves for it.
inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(vfloat v) {
  float s[kLanes];
  std::memcpy(s, &v, sizeof(s));
  for (int width = kLanes / 2; width > 0; width /= 2) {  // pairwise tree
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  }
  return s[0];
}

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
  const vfloat kMagic = splat(12582912.0f);
  const vfloat fx = x * splat(1.44269504088896341f) + kMagic;
  const vfloat n = fx - kMagic;
  vfloat r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);

  // 2 * (1 + r + r^2 * P(r)), P: Cephes expf coefficients, doubled
  vfloat q = splat(2.f * 1.9875691500e-4f);
  q = q * r + splat(2.f * 1.3981999507e-3f);
  q = q * r + splat(2.f * 8.3334519073e-3f);
  q = q * r + splat(2.f * 4.1665795894e-2f);
  q = q * r + splat(2.f * 1.6666665459e-1f);
  q = q * r + splat(2.f * 5.0000001201e-1f);
  const vfloat p = q * (r * r) + (r * splat(2.f) + splat(2.f));

  const vint ni = __builtin_convertvector(n, vint);
  const vfloat pow2 = (vfloat)((ni + 126) << 23);  // 2^(n-1); same-size vector cast = bit cast
  vfloat res = p * pow2;
  res = x < kMinX ? splat(0.f) : res;
  res = x > kMaxX ? splat(std::numeric_limits<float>::infinity()) : res;
  return res;
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
  vfloat p = splat(7.0376836292e-2f);
  p = p * f + splat(-1.1514610310e-1f);
  p = p * f + splat(1.1676998740e-1f);
  p = p * f + splat(-1.2420140846e-1f);
  p = p * f + splat(1.4249322787e-1f);
  p = p * f + splat(-1.6668057665e-1f);
  p = p * f + splat(2.0000714765e-1f);
  p = p * f + splat(-2.4999993993e-1f);
  p = p * f + splat(3.3333331174e-1f);
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

struct ScanArgs {
  const float* u;      // (batch, dim, L)
  const float* delta;  // (batch, dim, L), before bias and softplus
  const float* delta_bias;  // (dim) or nullptr
  bool delta_softplus;
  const float* A;      // (dim, Np), zero-padded
  const float* B;      // variable: (batch, GB, L, Np); invariant: (dim, Np)
  const float* C;      // same as B with GC
  const float* D;      // (dim) or nullptr
  const float* z;      // (batch, dim, L) or nullptr
  float* out;          // (batch, dim, L)
  float* last_state;   // (batch, dim, N) or nullptr
  int64_t dim, L, N, Np;
  bool B_variable, C_variable;
  int64_t GB, GC;
};

// Row pointer and per-step stride of B or C for one (batch, channel).
inline void bc_row(const float* base, bool variable, int64_t groups, const ScanArgs& a,
                   int64_t b, int64_t d, const float** row, int64_t* stride) {
  if (variable) {
    const int64_t g = d / (a.dim / groups);
    *row = base + (b * groups + g) * a.L * a.Np;
    *stride = a.Np;
  } else {
    *row = base + d * a.Np;
    *stride = 0;  // same coefficients at every step
  }
}

// Epilogue over one row: out = (y + D*u) * silu(z), vectorised over t.
inline void finish_row(const ScanArgs& a, int64_t row, int64_t d) {
  float* y = a.out + row * a.L;
  const float* u = a.u + row * a.L;
  const float* z = a.z ? a.z + row * a.L : nullptr;
  const float Dd = a.D ? a.D[d] : 0.f;
  if (!a.D && !z) return;
  int64_t t = 0;
  for (; t + kLanes <= a.L; t += kLanes) {
    vfloat v = load(y + t) + splat(Dd) * load(u + t);
    if (z) {
      vfloat zv = load(z + t);
      v = v * (zv / (splat(1.f) + vexp(-zv)));
    }
    store(y + t, v);
  }
  for (; t < a.L; ++t) {
    float v = y[t] + Dd * u[t];
    if (z) v = v * (z[t] / (1.f + std::exp(-z[t])));
    y[t] = v;
  }
}

// Scan of one (batch, channel) row.
void scan_row(const ScanArgs& a, int64_t b, int64_t d) {
  constexpr int64_t kBlock = 64;  // steps per block: buffers stay in L1
  const int64_t nv = a.Np / kLanes;
  const int64_t row = b * a.dim + d;
  const float* u = a.u + row * a.L;
  const float* delta = a.delta + row * a.L;
  const float bias = a.delta_bias ? a.delta_bias[d] : 0.f;
  const float* Ad = a.A + d * a.Np;
  float* y = a.out + row * a.L;
  const float *Brow, *Crow;
  int64_t Bs, Cs;
  bc_row(a.B, a.B_variable, a.GB, a, b, d, &Brow, &Bs);
  bc_row(a.C, a.C_variable, a.GC, a, b, d, &Crow, &Cs);

  std::vector<float> state(a.Np, 0.f);  // h between blocks
  alignas(32) float dtb[kBlock];        // delta after bias and softplus
  float du[kBlock];                     // delta * u
  vfloat acc[kBlock];                   // per step: lanes of <h_t, C_t>
  static_assert(kBlock % kLanes == 0, "blocks are whole vectors");
  for (int64_t t0 = 0; t0 < a.L; t0 += kBlock) {
    const int64_t tb = std::min(kBlock, a.L - t0);
    int64_t i = 0;
    for (; i + kLanes <= tb; i += kLanes) {
      const vfloat v = load(delta + t0 + i) + splat(bias);
      store(dtb + i, a.delta_softplus ? vsoftplus(v) : v);
    }
    for (; i < tb; ++i) {
      const float v = delta[t0 + i] + bias;
      dtb[i] = a.delta_softplus ? softplus_scalar(v) : v;
    }
    for (i = 0; i < tb; ++i) {
      du[i] = dtb[i] * u[t0 + i];
      acc[i] = splat(0.f);
    }
    for (int64_t j = 0; j < nv; ++j) {
      const vfloat Aj = load(Ad + j * kLanes);
      const float* Bj = Brow + t0 * Bs + j * kLanes;
      const float* Cj = Crow + t0 * Cs + j * kLanes;
      vfloat h = load(state.data() + j * kLanes);
      for (int64_t t = 0; t < tb; ++t) {
        h = vexp(splat(dtb[t]) * Aj) * h + splat(du[t]) * load(Bj + t * Bs);
        acc[t] += h * load(Cj + t * Cs);
      }
      store(state.data() + j * kLanes, h);
    }
    for (int64_t t = 0; t < tb; ++t) y[t0 + t] = hsum(acc[t]);
  }
  if (a.last_state) std::memcpy(a.last_state + row * a.N, state.data(), a.N * sizeof(float));
  finish_row(a, row, d);
}

// (dim, N) -> (dim, Np) zero-padded; zeros make padded lanes inert
// (dA = 1, B = 0 so h stays 0, C = 0 so nothing reaches y).
torch::Tensor pad_state_dim(const torch::Tensor& x, int64_t Np) {
  const int64_t N = x.size(-1);
  if (N == Np) return x.contiguous();
  return torch::constant_pad_nd(x, {0, Np - N}, 0.0).contiguous();
}

// (batch, G, N, L) -> (batch, G, L, Np): N contiguous for the inner loop.
torch::Tensor time_major(const torch::Tensor& x, int64_t Np) {
  return pad_state_dim(x.transpose(-1, -2), Np);
}

}  // namespace

std::vector<torch::Tensor> selective_scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                              torch::Tensor B, torch::Tensor C,
                                              c10::optional<torch::Tensor> D_,
                                              c10::optional<torch::Tensor> z_,
                                              c10::optional<torch::Tensor> delta_bias_,
                                              bool delta_softplus, bool return_last_state) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, dim, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A must be (dim, N)");
  TORCH_CHECK(!A.is_complex(), "complex A is not supported");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t Np = (N + kLanes - 1) / kLanes * kLanes;
  auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat32).contiguous(); };

  // bias and softplus are applied per block inside the kernel: no (B, D, L)
  // temporaries besides the output
  torch::Tensor uf = f32(u);
  torch::Tensor dt = f32(delta);
  torch::Tensor bias = delta_bias_.has_value() ? f32(*delta_bias_) : torch::Tensor();

  // B and C: (dim, N) invariant, (batch, N, L) or (batch, G, N, L) variable.
  auto prep_bc = [&](const torch::Tensor& x, const char* name, bool* variable, int64_t* groups) {
    if (x.dim() == 2) {
      TORCH_CHECK(x.size(0) == dim && x.size(1) == N, name, " must be (dim, N) when time-invariant");
      *variable = false;
      *groups = 1;
      return pad_state_dim(x.to(torch::kFloat32), Np);
    }
    torch::Tensor x4 = x.dim() == 3 ? x.unsqueeze(1) : x;
    TORCH_CHECK(x4.dim() == 4 && x4.size(0) == batch && x4.size(2) == N && x4.size(3) == L,
                name, " must be (batch, N, L) or (batch, G, N, L)");
    TORCH_CHECK(dim % x4.size(1) == 0, name, ": groups must divide dim");
    *variable = true;
    *groups = x4.size(1);
    return time_major(x4.to(torch::kFloat32), Np);
  };
  bool Bvar, Cvar;
  int64_t GB, GC;
  torch::Tensor Bp = prep_bc(B, "B", &Bvar, &GB);
  torch::Tensor Cp = prep_bc(C, "C", &Cvar, &GC);
  torch::Tensor Ap = pad_state_dim(A.to(torch::kFloat32), Np);
  torch::Tensor Df = D_.has_value() ? f32(*D_) : torch::Tensor();
  torch::Tensor zf = z_.has_value() ? f32(*z_) : torch::Tensor();

  torch::Tensor out = torch::empty({batch, dim, L}, uf.options());
  torch::Tensor last = return_last_state ? torch::empty({batch, dim, N}, uf.options()) : torch::Tensor();

  ScanArgs a{uf.data_ptr<float>(), dt.data_ptr<float>(),
             bias.defined() ? bias.data_ptr<float>() : nullptr, delta_softplus, Ap.data_ptr<float>(),
             Bp.data_ptr<float>(), Cp.data_ptr<float>(),
             Df.defined() ? Df.data_ptr<float>() : nullptr,
             zf.defined() ? zf.data_ptr<float>() : nullptr,
             out.data_ptr<float>(), last.defined() ? last.data_ptr<float>() : nullptr,
             dim, L, N, Np, Bvar, Cvar, GB, GC};

  // One (batch, channel) row per task; rows cost the same, so a grain of 1
  // lets parallel_for split them evenly over the intra-op threads.
  at::parallel_for(0, batch * dim, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) scan_row(a, r / dim, r % dim);
  });

  if (return_last_state) return {out, last};
  return {out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &selective_scan_fwd, "selective scan forward (fp32, CPU)",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D") = py::none(), py::arg("z") = py::none(), py::arg("delta_bias") = py::none(),
        py::arg("delta_softplus") = false, py::arg("return_last_state") = false);
}
