// Selective scan (Mamba S6) on the CPU: a fused forward and a fused backward.
//
// Semantics are those of mamba-ssm's selective_scan_ref:
//   dA_t = exp(delta_t * A),  h_t = dA_t * h_{t-1} + delta_t * u_t * B_t,
//   y_t = <h_t, C_t> + D * u_t,  out_t = y_t * silu(z_t),
// in fp32 (fp64 when the inputs are fp64: that is what gradcheck runs).
//
// Two layouts of the work, each one task per unit spread over torch's
// intra-op threads with at::parallel_for:
// - wide (N > 4): one task per (batch, channel) row. Time is cut into blocks
//   of kBlock steps; for each register-wide slice of the state dimension N the
//   recurrence runs over the block with that slice in one register, and the
//   partial <h_t, C_t> of every step is accumulated in a small L1 buffer. N is
//   padded to the vector width with inert lanes (A = B = C = 0).
// - narrow (N <= 4, e.g. MemoryMamba's d_state 1): padding would waste most
//   lanes, so one task takes kLanes channels of one B/C group and the lanes run
//   across channels; the rows are transposed to time-major tiles first.
// Backward (both layouts) recomputes the states of a task's rows from its
// inputs (nothing of size B*D*L*N is kept between forward and backward, as in
// mamba-ssm's CUDA kernel; for_backward, the wide forward saves the state entering
// each chunk of about 128 steps, N/128 of u's size, and the backward recomputes chunk
// by chunk in L1; with z also the output before the gate, so the backward does not
// sum <h, C> again), then runs the adjoint recurrence backwards in time:
//   x_t = <dA_{t+1}, x_{t+1}> + g_t C_t,  g_t = dout_t * silu(z_t),
// where x_t is dLoss/dh_t. Gradients of parameters shared between rows
// (A, D, delta_bias, and B/C shared by a group of channels) are summed into
// per-thread buffers and reduced at the end: no atomics, no races.
// The vectors are GCC/Clang vector extensions, 8 floats with AVX and 4
// otherwise: the same source compiles to AVX2 (the loader adds -mavx2 -mfma
// when the CPU has them), to SSE on older x86 and to NEON on aarch64 (Jetson);
// no -march=native.
// exp() is a branch-free Cephes-style polynomial on those vectors: the
// D*N*L exps dominate the cost, and the only loop-carried dependency per
// step is one multiply-add, so the exps of later steps overlap it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "selective_scan_cpu.h"

namespace {

using namespace edgediag_scan;

// ------------------------------------------------------------------ host side

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

// Inputs converted once, shared by forward and backward.
struct Prepared {
  torch::ScalarType dtype;
  torch::Tensor u, delta, bias, A, B, C, D, z;
  int64_t batch, dim, L, N, Np, GB, GC;
  bool Bvar, Cvar;
};

Prepared prepare(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                 const torch::Tensor& B, const torch::Tensor& C, const c10::optional<torch::Tensor>& D_,
                 const c10::optional<torch::Tensor>& z_, const c10::optional<torch::Tensor>& delta_bias_) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, dim, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A must be (dim, N)");
  TORCH_CHECK(!A.is_complex(), "complex A is not supported");
  Prepared p;
  // fp32 arithmetic as mamba-ssm's reference; fp64 stays fp64 (gradcheck)
  p.dtype = u.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  p.batch = u.size(0), p.dim = u.size(1), p.L = u.size(2), p.N = A.size(1);
  p.Np = p.dtype == torch::kFloat64 ? padded_state<double>(p.N) : padded_state<float>(p.N);
  auto cast = [&](const torch::Tensor& t) { return t.to(p.dtype).contiguous(); };
  // bias and softplus are applied inside the kernel: no (B, D, L) temporaries
  p.u = cast(u);
  p.delta = cast(delta);
  if (delta_bias_.has_value()) p.bias = cast(*delta_bias_);
  // B and C: (dim, N) invariant, (batch, N, L) or (batch, G, N, L) variable.
  auto prep_bc = [&](const torch::Tensor& x, const char* name, bool* variable, int64_t* groups) {
    if (x.dim() == 2) {
      TORCH_CHECK(x.size(0) == p.dim && x.size(1) == p.N, name, " must be (dim, N) when time-invariant");
      *variable = false;
      *groups = 1;
      return pad_state_dim(x.to(p.dtype), p.Np);
    }
    torch::Tensor x4 = x.dim() == 3 ? x.unsqueeze(1) : x;
    TORCH_CHECK(x4.dim() == 4 && x4.size(0) == p.batch && x4.size(2) == p.N && x4.size(3) == p.L,
                name, " must be (batch, N, L) or (batch, G, N, L)");
    TORCH_CHECK(p.dim % x4.size(1) == 0, name, ": groups must divide dim");
    *variable = true;
    *groups = x4.size(1);
    return time_major(x4.to(p.dtype), p.Np);
  };
  p.B = prep_bc(B, "B", &p.Bvar, &p.GB);
  p.C = prep_bc(C, "C", &p.Cvar, &p.GC);
  p.A = pad_state_dim(A.to(p.dtype), p.Np);
  if (D_.has_value()) p.D = cast(*D_);
  if (z_.has_value()) p.z = cast(*z_);
  return p;
}

template <typename T>
const T* ptr(const torch::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

template <typename T>
ScanArgs<T> scan_args(const Prepared& p, const torch::Tensor& out, const torch::Tensor& last, bool softplus,
                      bool allow_narrow) {
  return ScanArgs<T>{p.u.data_ptr<T>(), p.delta.data_ptr<T>(), ptr<T>(p.bias), softplus,
                     p.A.data_ptr<T>(), p.B.data_ptr<T>(), p.C.data_ptr<T>(), ptr<T>(p.D), ptr<T>(p.z),
                     out.defined() ? out.data_ptr<T>() : nullptr,
                     last.defined() ? last.data_ptr<T>() : nullptr,
                     p.dim, p.L, p.N, p.Np, p.Bvar, p.Cvar, p.GB, p.GC, allow_narrow};
}

// (batch, dim, n_chunks, Np): the state entering each backward chunk (wide layout)
int64_t chunk_count(const Prepared& p) {
  return p.dtype == torch::kFloat64 ? n_chunks<double>(p.L, p.Np) : n_chunks<float>(p.L, p.Np);
}

// Rows (wide) or channel groups (narrow) per task: every unit costs the same,
// so a grain of 1 lets parallel_for split them evenly over the threads.
template <typename T, typename Wide, typename Narrow>
void for_each_unit(const ScanArgs<T>& a, int64_t batch, Wide wide, Narrow narrow) {
  if (use_narrow(a)) {
    const int64_t per_batch = a.dim / Vec<T>::kLanes;
    at::parallel_for(0, batch * per_batch, 1, [&](int64_t begin, int64_t end) {
      narrow(begin, end, per_batch);
    });
  } else {
    at::parallel_for(0, batch * a.dim, 1, [&](int64_t begin, int64_t end) { wide(begin, end); });
  }
}

template <typename T>
void forward_impl(const ScanArgs<T>& a, int64_t batch) {
  constexpr int K = Vec<T>::kLanes;
  for_each_unit<T>(
      a, batch,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) scan_row(a, r / a.dim, r % a.dim);
      },
      [&](int64_t begin, int64_t end, int64_t per_batch) {
        NarrowScratch<T> s;
        for (int64_t r = begin; r < end; ++r) scan_narrow(a, r / per_batch, (r % per_batch) * K, s);
      });
}

// threads: the per-thread gradient slices; 1 when called inside another
// parallel region (parallel_for then runs inline, on the caller's thread number).
template <typename T>
void backward_impl(const ScanArgs<T>& a, const GradArgs<T>& g, int64_t batch, int64_t threads) {
  constexpr int K = Vec<T>::kLanes;
  auto thread_slot = [&]() { return threads == 1 ? 0 : at::get_thread_num(); };
  for_each_unit<T>(
      a, batch,
      [&](int64_t begin, int64_t end) {
        RowScratch<T> s;
        const int tid = thread_slot();
        for (int64_t r = begin; r < end; ++r) scan_row_bwd(a, g, r / a.dim, r % a.dim, tid, s);
      },
      [&](int64_t begin, int64_t end, int64_t per_batch) {
        NarrowScratch<T> s;
        const int tid = thread_slot();
        for (int64_t r = begin; r < end; ++r) scan_narrow_bwd(a, g, r / per_batch, (r % per_batch) * K, tid, s);
      });
}

}  // namespace

std::vector<torch::Tensor> selective_scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                              torch::Tensor B, torch::Tensor C,
                                              c10::optional<torch::Tensor> D_,
                                              c10::optional<torch::Tensor> z_,
                                              c10::optional<torch::Tensor> delta_bias_,
                                              bool delta_softplus, bool return_last_state, bool narrow,
                                              bool for_backward) {
  const Prepared p = prepare(u, delta, A, B, C, D_, z_, delta_bias_);
  const auto opts = p.u.options();
  torch::Tensor out = torch::empty({p.batch, p.dim, p.L}, opts);
  torch::Tensor last = return_last_state ? torch::empty({p.batch, p.dim, p.N}, opts) : torch::Tensor();
  // for the wide layout's backward: the chunk states, and with z the output before the
  // gate; undefined (None) where the backward needs them not (narrow layout, no z)
  torch::Tensor states, pregate;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    ScanArgs<T> a = scan_args<T>(p, out, last, delta_softplus, narrow);
    if (for_backward && !use_narrow(a)) {
      states = torch::empty({p.batch, p.dim, chunk_count(p), p.Np}, opts);
      a.chunk_states = states.data_ptr<T>();
      if (p.z.defined()) {
        pregate = torch::empty({p.batch, p.dim, p.L}, opts);
        a.pregate = pregate.data_ptr<T>();
      }
    }
    forward_impl(a, p.batch);
  };
  if (p.dtype == torch::kFloat64) run(0.0); else run(0.f);
  std::vector<torch::Tensor> res{out};
  if (return_last_state) res.push_back(last);
  if (for_backward) res.insert(res.end(), {states, pregate});
  return res;
}

// Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the compute dtype,
// shaped as the inputs; those of absent optional inputs are empty tensors.
std::vector<torch::Tensor> selective_scan_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                              torch::Tensor B, torch::Tensor C,
                                              c10::optional<torch::Tensor> D_,
                                              c10::optional<torch::Tensor> z_,
                                              c10::optional<torch::Tensor> delta_bias_,
                                              bool delta_softplus, torch::Tensor dout, bool narrow,
                                              c10::optional<torch::Tensor> chunk_states_,
                                              c10::optional<torch::Tensor> pregate_) {
  const Prepared p = prepare(u, delta, A, B, C, D_, z_, delta_bias_);
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must have the shape of u");
  torch::Tensor states = chunk_states_.has_value() ? *chunk_states_ : torch::Tensor();
  if (states.defined()) {
    TORCH_CHECK(states.sizes() == torch::IntArrayRef({p.batch, p.dim, chunk_count(p), p.Np}) &&
                    states.scalar_type() == p.dtype && states.is_contiguous(),
                "chunk_states must be the forward's, for these inputs");
  }
  torch::Tensor pregate = pregate_.has_value() ? *pregate_ : torch::Tensor();
  if (pregate.defined()) {
    TORCH_CHECK(p.z.defined() && pregate.sizes() == u.sizes() && pregate.scalar_type() == p.dtype &&
                    pregate.is_contiguous(),
                "pregate must be the forward's, for these inputs (with z)");
  }
  const auto opts = p.u.options();
  torch::Tensor doutc = dout.to(p.dtype).contiguous();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  torch::Tensor du = torch::empty({p.batch, p.dim, p.L}, opts);
  torch::Tensor ddelta = torch::empty({p.batch, p.dim, p.L}, opts);
  torch::Tensor dz = p.z.defined() ? torch::empty({p.batch, p.dim, p.L}, opts) : torch::Tensor();
  torch::Tensor dA = torch::zeros({threads, p.dim, p.Np}, opts);
  auto bc_grad = [&](bool variable, int64_t groups) {
    return variable ? torch::zeros({threads, p.batch, groups, p.L, p.Np}, opts)
                    : torch::zeros({threads, p.dim, p.Np}, opts);
  };
  torch::Tensor dB = bc_grad(p.Bvar, p.GB), dC = bc_grad(p.Cvar, p.GC);
  torch::Tensor dD = torch::zeros({threads, p.dim}, opts), dbias = torch::zeros({threads, p.dim}, opts);

  auto run = [&](auto zero) {
    using T = decltype(zero);
    ScanArgs<T> a = scan_args<T>(p, torch::Tensor(), torch::Tensor(), delta_softplus, narrow);
    if (!use_narrow(a)) {
      if (states.defined()) a.chunk_states = states.data_ptr<T>();
      if (pregate.defined()) a.pregate = pregate.data_ptr<T>();
    }
    const GradArgs<T> g{doutc.data_ptr<T>(), du.data_ptr<T>(), ddelta.data_ptr<T>(),
                        dz.defined() ? dz.data_ptr<T>() : nullptr, dA.data_ptr<T>(),
                        dB.data_ptr<T>(), dC.data_ptr<T>(), dD.data_ptr<T>(), dbias.data_ptr<T>(),
                        dB.numel() / threads, dC.numel() / threads};
    backward_impl(a, g, p.batch, threads);
  };
  if (p.dtype == torch::kFloat64) run(0.0); else run(0.f);

  // per-thread sums -> one gradient, unpadded and shaped as the input
  auto finish_bc = [&](const torch::Tensor& g, const torch::Tensor& x) {
    torch::Tensor s = g.sum(0).narrow(-1, 0, p.N);
    if (x.dim() == 2) return s.contiguous();
    s = s.transpose(-1, -2).contiguous();  // (batch, G, N, L)
    return x.dim() == 3 ? s.squeeze(1) : s;
  };
  torch::Tensor empty;
  return {du, ddelta, dA.sum(0).narrow(-1, 0, p.N).contiguous(), finish_bc(dB, B), finish_bc(dC, C),
          D_.has_value() ? dD.sum(0) : empty, dz.defined() ? dz : empty,
          delta_bias_.has_value() ? dbias.sum(0) : empty};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &selective_scan_fwd, "selective scan forward (fp32 or fp64, CPU)",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D") = py::none(), py::arg("z") = py::none(), py::arg("delta_bias") = py::none(),
        py::arg("delta_softplus") = false, py::arg("return_last_state") = false, py::arg("narrow") = true,
        py::arg("for_backward") = false);
  m.def("bwd", &selective_scan_bwd, "selective scan backward (fp32 or fp64, CPU): recomputes the states",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D") = py::none(), py::arg("z") = py::none(), py::arg("delta_bias") = py::none(),
        py::arg("delta_softplus") = false, py::arg("dout") = py::none(), py::arg("narrow") = true,
        py::arg("chunk_states") = py::none(), py::arg("pregate") = py::none());
  m.def("chunk_steps", [](int64_t N, bool fp64) {
          return fp64 ? chunk_steps<double>(padded_state<double>(N)) : chunk_steps<float>(padded_state<float>(N));
        }, "steps per chunk of the wide layout's saved states and chunked backward, for d_state N",
        py::arg("N"), py::arg("fp64") = false);
}
