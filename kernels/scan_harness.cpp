// Stand-alone test of the selective-scan kernels (selective_scan_cpu.h), no torch:
// forward against a plain double-precision reference, gradients against central
// finite differences of that reference, for the wide and the narrow layouts,
// in fp32 and fp64. Built and run by tests/test_scan_kernel_arm.py natively and,
// cross-compiled with aarch64-linux-gnu-g++, under qemu-aarch64 (the NEON build
// a Jetson compiles). Exit status 0 when every case is within tolerance.
//
//   g++ -std=c++17 -O2 kernels/scan_harness.cpp -o scan_harness && ./scan_harness

#include <cstdio>
#include <random>
#include <string>

#include "selective_scan_cpu.h"

using namespace edgediag_scan;

namespace {

struct Case {
  int64_t batch, dim, L, N;
  int64_t GB, GC;  // 0: time-invariant (dim, N); else (batch, G, N, L)
  bool D, z, bias, softplus;
};

// Inputs in the user's layout, as doubles.
struct Inputs {
  std::vector<double> u, delta, A, B, C, D, z, bias;
};

int64_t bc_size(const Case& c, int64_t G) { return G ? c.batch * G * c.N * c.L : c.dim * c.N; }

Inputs make_inputs(const Case& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.5, 2.0);
  Inputs in;
  const int64_t n = c.batch * c.dim * c.L;
  for (int64_t i = 0; i < n; ++i) in.u.push_back(nd(gen)), in.delta.push_back(0.5 * nd(gen));
  for (int64_t i = 0; i < c.dim * c.N; ++i) in.A.push_back(-ud(gen));
  for (int64_t i = 0; i < bc_size(c, c.GB); ++i) in.B.push_back(nd(gen));
  for (int64_t i = 0; i < bc_size(c, c.GC); ++i) in.C.push_back(nd(gen));
  if (c.D) for (int64_t i = 0; i < c.dim; ++i) in.D.push_back(nd(gen));
  if (c.z) for (int64_t i = 0; i < n; ++i) in.z.push_back(nd(gen));
  if (c.bias) for (int64_t i = 0; i < c.dim; ++i) in.bias.push_back(0.3 * nd(gen));
  return in;
}

double bc_at(const Case& c, const std::vector<double>& X, int64_t G, int64_t b, int64_t d, int64_t n, int64_t t) {
  if (!G) return X[d * c.N + n];
  const int64_t g = d / (c.dim / G);
  return X[((b * G + g) * c.N + n) * c.L + t];
}

// The recurrence written out, in double: out (batch, dim, L).
std::vector<double> reference(const Case& c, const Inputs& in) {
  std::vector<double> out(c.batch * c.dim * c.L);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t d = 0; d < c.dim; ++d) {
      std::vector<double> h(c.N, 0.0);
      for (int64_t t = 0; t < c.L; ++t) {
        const int64_t i = (b * c.dim + d) * c.L + t;
        double dt = in.delta[i] + (c.bias ? in.bias[d] : 0.0);
        if (c.softplus) dt = dt > 20 ? dt : std::log1p(std::exp(dt));
        double y = 0;
        for (int64_t n = 0; n < c.N; ++n) {
          h[n] = std::exp(dt * in.A[d * c.N + n]) * h[n] + dt * in.u[i] * bc_at(c, in.B, c.GB, b, d, n, t);
          y += h[n] * bc_at(c, in.C, c.GC, b, d, n, t);
        }
        if (c.D) y += in.D[d] * in.u[i];
        if (c.z) y *= in.z[i] / (1 + std::exp(-in.z[i]));
        out[i] = y;
      }
    }
  return out;
}

// The kernel's layouts: A (dim, Np); B/C variable (batch, G, L, Np), invariant (dim, Np).
template <typename T>
std::vector<T> padded_bc(const Case& c, const std::vector<double>& X, int64_t G, int64_t Np) {
  if (!G) {
    std::vector<T> p(c.dim * Np, T(0));
    for (int64_t d = 0; d < c.dim; ++d)
      for (int64_t n = 0; n < c.N; ++n) p[d * Np + n] = T(X[d * c.N + n]);
    return p;
  }
  std::vector<T> p(c.batch * G * c.L * Np, T(0));
  for (int64_t bg = 0; bg < c.batch * G; ++bg)
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t t = 0; t < c.L; ++t) p[(bg * c.L + t) * Np + n] = T(X[(bg * c.N + n) * c.L + t]);
  return p;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) { return std::vector<T>(x.begin(), x.end()); }

template <typename T>
const T* opt(const std::vector<T>& x) { return x.empty() ? nullptr : x.data(); }

// Kernel forward and backward for loss = sum(w * out); the gradients in the users' layout.
struct KernelResult {
  std::vector<double> out, du, ddelta, dA, dB, dC, dD, dz, dbias;
};

// narrow: allow the channel-lane layout; chunked: the wide forward saves the state
// entering each chunk and the output before the gate, and the backward recomputes
// from them (else the whole row, summing y again).
template <typename T>
KernelResult run_kernel(const Case& c, const Inputs& in, const std::vector<double>& w, bool narrow, bool chunked) {
  constexpr int K = Vec<T>::kLanes;
  const int64_t Np = padded_state<T>(c.N), n = c.batch * c.dim * c.L;
  std::vector<T> u = cast<T>(in.u), delta = cast<T>(in.delta), D = cast<T>(in.D), z = cast<T>(in.z);
  std::vector<T> bias = cast<T>(in.bias), A(c.dim * Np, T(0));
  for (int64_t d = 0; d < c.dim; ++d)
    for (int64_t s = 0; s < c.N; ++s) A[d * Np + s] = T(in.A[d * c.N + s]);
  std::vector<T> B = padded_bc<T>(c, in.B, c.GB, Np), C = padded_bc<T>(c, in.C, c.GC, Np);
  std::vector<T> out(n), dout = cast<T>(w);
  ScanArgs<T> a{u.data(), delta.data(), opt(bias), c.softplus, A.data(), B.data(), C.data(), opt(D), opt(z),
                out.data(), nullptr, c.dim, c.L, c.N, Np, c.GB > 0, c.GC > 0,
                c.GB ? c.GB : 1, c.GC ? c.GC : 1, narrow};
  std::vector<T> du(n), ddelta(n), dz(c.z ? n : 0), dA(c.dim * Np, T(0));
  std::vector<T> dB(B.size(), T(0)), dC(C.size(), T(0)), dD(c.dim, T(0)), dbias(c.dim, T(0));
  GradArgs<T> g{dout.data(), du.data(), ddelta.data(), c.z ? dz.data() : nullptr, dA.data(), dB.data(),
                dC.data(), dD.data(), dbias.data(), int64_t(dB.size()), int64_t(dC.size())};
  if (use_narrow(a)) {
    NarrowScratch<T> s;
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t d0 = 0; d0 < c.dim; d0 += K) scan_narrow(a, b, d0, s), scan_narrow_bwd(a, g, b, d0, 0, s);
  } else {
    RowScratch<T> s;
    std::vector<T> states(chunked ? c.batch * c.dim * n_chunks<T>(c.L, Np) * Np : 0), pregate(chunked ? n : 0);
    if (chunked) a.chunk_states = states.data(), a.pregate = pregate.data();
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t d = 0; d < c.dim; ++d) scan_row(a, b, d), scan_row_bwd(a, g, b, d, 0, s);
  }
  KernelResult r;
  auto to_double = [](const std::vector<T>& x) { return std::vector<double>(x.begin(), x.end()); };
  r.out = to_double(out), r.du = to_double(du), r.ddelta = to_double(ddelta), r.dz = to_double(dz);
  r.dD = c.D ? to_double(dD) : std::vector<double>();
  r.dbias = c.bias ? to_double(dbias) : std::vector<double>();
  for (int64_t d = 0; d < c.dim; ++d)
    for (int64_t s = 0; s < c.N; ++s) r.dA.push_back(dA[d * Np + s]);
  auto unpad = [&](const std::vector<T>& p, int64_t G) {  // back to (dim, N) or (batch, G, N, L)
    std::vector<double> x(bc_size(c, G));
    if (!G) {
      for (int64_t d = 0; d < c.dim; ++d)
        for (int64_t s = 0; s < c.N; ++s) x[d * c.N + s] = p[d * Np + s];
    } else {
      for (int64_t bg = 0; bg < c.batch * G; ++bg)
        for (int64_t s = 0; s < c.N; ++s)
          for (int64_t t = 0; t < c.L; ++t) x[(bg * c.N + s) * c.L + t] = p[(bg * c.L + t) * Np + s];
    }
    return x;
  };
  r.dB = unpad(dB, c.GB), r.dC = unpad(dC, c.GC);
  return r;
}

double loss(const Case& c, const Inputs& in, const std::vector<double>& w) {
  const std::vector<double> out = reference(c, in);
  double s = 0;
  for (size_t i = 0; i < out.size(); ++i) s += w[i] * out[i];
  return s;
}

// max |kernel - finite difference| / max |finite difference| over up to 12
// elements of each input, spread over the tensor.
double grad_error(const Case& c, Inputs in, const std::vector<double>& w,
                  std::vector<double> Inputs::*field, const std::vector<double>& grad) {
  std::vector<double>& x = in.*field;
  if (x.empty()) return 0;
  double worst = 0, scale = 1e-12;
  const size_t step = std::max<size_t>(1, x.size() / 12);
  for (size_t i = 0; i < x.size(); i += step) {
    const double x0 = x[i], eps = 1e-6;
    x[i] = x0 + eps;
    const double up = loss(c, in, w);
    x[i] = x0 - eps;
    const double down = loss(c, in, w);
    x[i] = x0;
    const double fd = (up - down) / (2 * eps);
    worst = std::max(worst, std::abs(fd - grad[i]));
    scale = std::max(scale, std::abs(fd));
  }
  return worst / scale;
}

double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0, scale = 1e-12;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i])), scale = std::max(scale, std::abs(b[i]));
  return worst / scale;
}

}  // namespace

int main() {
  // tolerances: fp32 kernel vs the fp64 reference; fp64 kernel vs finite differences
  const double kFwd32 = 1e-5, kGrad32 = 1e-4, kFwd64 = 1e-12, kGrad64 = 1e-6;
  const Case cases[] = {
      {2, 16, 37, 1, 2, 2, true, true, true, true},    // MemoryMamba-like: d_state 1, grouped
      {2, 16, 9, 3, 0, 1, true, false, true, true},    // invariant B, variable C
      {1, 16, 1, 2, 1, 0, false, true, false, false},  // L = 1
      {2, 8, 37, 13, 1, 1, true, true, true, true},    // padded state
      {1, 8, 70, 16, 0, 0, true, false, false, true},  // time-invariant, two blocks' worth of tail
      {1, 12, 20, 4, 3, 3, true, true, true, true},    // 4 channels per group: wide even at N = 4
      {1, 4, 300, 16, 1, 1, true, true, true, true},   // several backward chunks (64 or 128 steps)
  };
  int failures = 0, n_case = 0;
  for (const Case& c : cases) {
    for (bool narrow : {true, false}) {
      const Inputs in = make_inputs(c, 1234 + n_case);
      std::vector<double> w(c.batch * c.dim * c.L);
      std::mt19937 gen(99);
      std::normal_distribution<double> nd(0.0, 1.0);
      for (double& v : w) v = nd(gen);
      const std::vector<double> ref = reference(c, in);
      // the wide runs recompute chunk by chunk; the others (wide where N > 4) the whole row
      const KernelResult r32 = run_kernel<float>(c, in, w, narrow, !narrow);
      const KernelResult r64 = run_kernel<double>(c, in, w, narrow, !narrow);
      const double f32 = max_rel(r32.out, ref), f64 = max_rel(r64.out, ref);
      double g64 = 0, g32 = 0;
      const std::pair<std::vector<double> Inputs::*, std::vector<double> KernelResult::*> fields[] = {
          {&Inputs::u, &KernelResult::du},       {&Inputs::delta, &KernelResult::ddelta},
          {&Inputs::A, &KernelResult::dA},       {&Inputs::B, &KernelResult::dB},
          {&Inputs::C, &KernelResult::dC},       {&Inputs::D, &KernelResult::dD},
          {&Inputs::z, &KernelResult::dz},       {&Inputs::bias, &KernelResult::dbias}};
      for (const auto& f : fields) {
        g64 = std::max(g64, grad_error(c, in, w, f.first, r64.*(f.second)));
        // fp32 gradients against the fp64 kernel's (which the finite differences vouch for)
        g32 = std::max(g32, max_rel(r32.*(f.second), r64.*(f.second)));
      }
      const bool ok = f32 <= kFwd32 && f64 <= kFwd64 && g64 <= kGrad64 && g32 <= kGrad32;
      failures += !ok;
      std::printf("%s case %d N=%lld L=%lld %s: fwd fp32 %.1e fp64 %.1e, grad fp64-vs-fd %.1e fp32-vs-fp64 %.1e\n",
                  ok ? "ok  " : "FAIL", n_case, (long long)c.N, (long long)c.L, narrow ? "narrow-allowed" : "wide, chunked",
                  f32, f64, g64, g32);
    }
    ++n_case;
  }
  std::printf("%s: %d failure(s), %d lanes of fp32\n", failures ? "FAILED" : "PASSED", failures, Vec<float>::kLanes);
  return failures ? 1 : 0;
}
