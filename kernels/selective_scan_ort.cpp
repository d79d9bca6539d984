// The selective scan as an ONNX Runtime custom operator: edgediag::SelectiveScan.
//
// The same torch-free kernels as the eager `cpu` backend (selective_scan_cpu.h), behind ONNX
// Runtime's C API, so an exported scan model runs the fused kernel instead of the ~1,000-node
// chunked scan graph. Built as a shared library by edgediag/runtime/custom_ops.py and loaded
// with SessionOptions.register_custom_ops_library(); it needs only onnxruntime_c_api.h (no
// torch, no onnxruntime C++ wrapper), so the board builds it as well.
//
// Node (domain "edgediag", version 1), all tensors float32:
//   inputs   u (batch, dim, L), delta (batch, dim, L), A (dim, N),
//            B, C: (dim, N) time-invariant, (batch, N, L) or (batch, G, N, L) variable,
//            D (dim), delta_bias (dim), z (batch, dim, L) optional (last, may be absent)
//   attribute delta_softplus: int, 0 or 1
//   output   y (batch, dim, L) = mamba-ssm selective_scan_fn(u, delta, A, B, C, D, z, delta_bias,
//            delta_softplus)
// The exporter writes zeros for an absent D or delta_bias (both are exact no-ops).
//
// API level: 17 (ONNX Runtime 1.17, the oldest the project supports); the struct fields
// of later levels stay zero and ONNX Runtime reads them only for a higher `version`.

#include <cstdio>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"
#include "selective_scan_cpu.h"

namespace {

using namespace edgediag_scan;
constexpr uint32_t kApiLevel = 17;
const OrtApi* g_api = nullptr;

struct Kernel {
  int64_t softplus = 0;
};

struct Input {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

OrtStatus* read_input(OrtKernelContext* ctx, size_t index, Input* out) {
  const OrtValue* value = nullptr;
  if (OrtStatus* s = g_api->KernelContext_GetInput(ctx, index, &value)) return s;
  if (value == nullptr) return nullptr;  // an absent optional input
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = g_api->GetTensorTypeAndShape(value, &info)) return s;
  size_t rank = 0;
  OrtStatus* s = g_api->GetDimensionsCount(info, &rank);
  if (s == nullptr) {
    out->shape.resize(rank);
    s = g_api->GetDimensions(info, out->shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (s) return s;
  void* data = nullptr;
  if (OrtStatus* s2 = g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data)) return s2;
  out->data = static_cast<const float*>(data);
  return nullptr;
}

OrtStatus* fail(const std::string& msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("edgediag::SelectiveScan: " + msg).c_str());
}

std::string dims(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

// (rows, N) -> (rows, Np), zero-padded: padded lanes are inert (A = B = C = 0).
void pad_rows(const float* x, int64_t rows, int64_t N, int64_t Np, std::vector<float>* out) {
  out->assign(rows * Np, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < N; ++n) (*out)[r * Np + n] = x[r * N + n];
}

// B or C in the kernel's layout: (dim, Np) time-invariant, (batch, G, L, Np) variable.
OrtStatus* prepare_bc(const Input& x, const char* name, int64_t batch, int64_t dim, int64_t N, int64_t L,
                      int64_t Np, std::vector<float>* out, bool* variable, int64_t* groups) {
  const auto& s = x.shape;
  if (s.size() == 2) {
    if (s[0] != dim || s[1] != N) return fail(std::string(name) + " must be (dim, N) = " + dims({dim, N}) + ", got " + dims(s));
    *variable = false;
    *groups = 1;
    pad_rows(x.data, dim, N, Np, out);
    return nullptr;
  }
  const bool grouped = s.size() == 4;
  const int64_t G = grouped ? s[1] : 1;
  if ((s.size() != 3 && !grouped) || s[0] != batch || s[s.size() - 2] != N || s.back() != L || G <= 0 ||
      dim % G)
    return fail(std::string(name) + " must be (batch, N, L) or (batch, G, N, L) with G dividing dim; got " + dims(s));
  *variable = true;
  *groups = G;
  out->assign(batch * G * L * Np, 0.f);
  for (int64_t bg = 0; bg < batch * G; ++bg)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < L; ++t) (*out)[(bg * L + t) * Np + n] = x.data[(bg * N + n) * L + t];
  return nullptr;
}

struct Work {
  const ScanArgs<float>* args;
  int64_t dim;
  int64_t per_batch;  // narrow: channel groups per batch item
};

void wide_unit(void* data, size_t r) {
  const Work* w = static_cast<const Work*>(data);
  scan_row(*w->args, static_cast<int64_t>(r) / w->dim, static_cast<int64_t>(r) % w->dim);
}

void narrow_unit(void* data, size_t r) {
  const Work* w = static_cast<const Work*>(data);
  thread_local NarrowScratch<float> scratch;  // reused by every unit a thread runs
  const int64_t i = static_cast<int64_t>(r);
  scan_narrow(*w->args, i / w->per_batch, (i % w->per_batch) * Vec<float>::kLanes, scratch);
}

OrtStatus* compute(const Kernel& k, OrtKernelContext* ctx) {
  Input in[8];
  size_t count = 0;
  if (OrtStatus* s = g_api->KernelContext_GetInputCount(ctx, &count)) return s;
  for (size_t i = 0; i < count && i < 8; ++i)
    if (OrtStatus* s = read_input(ctx, i, &in[i])) return s;
  const Input &u = in[0], &delta = in[1], &A = in[2], &D = in[5], &bias = in[6], &z = in[7];
  if (u.shape.size() != 3) return fail("u must be (batch, dim, L), got " + dims(u.shape));
  const int64_t batch = u.shape[0], dim = u.shape[1], L = u.shape[2];
  if (delta.shape != u.shape) return fail("delta must have u's shape " + dims(u.shape) + ", got " + dims(delta.shape));
  if (A.shape.size() != 2 || A.shape[0] != dim) return fail("A must be (dim, N), got " + dims(A.shape));
  const int64_t N = A.shape[1];
  if (N < 1) return fail("A must have at least one state");
  for (const Input* p : {&D, &bias})
    if (p->data && (p->shape.size() != 1 || p->shape[0] != dim))
      return fail("D and delta_bias must be (dim), got " + dims(p->shape));
  if (z.data && z.shape != u.shape) return fail("z must have u's shape " + dims(u.shape) + ", got " + dims(z.shape));

  constexpr int K = Vec<float>::kLanes;
  const int64_t Np = padded_state<float>(N);
  std::vector<float> Ap, Bp, Cp;
  pad_rows(A.data, dim, N, Np, &Ap);
  bool Bvar = false, Cvar = false;
  int64_t GB = 1, GC = 1;
  if (OrtStatus* s = prepare_bc(in[3], "B", batch, dim, N, L, Np, &Bp, &Bvar, &GB)) return s;
  if (OrtStatus* s = prepare_bc(in[4], "C", batch, dim, N, L, Np, &Cp, &Cvar, &GC)) return s;

  OrtValue* y = nullptr;
  if (OrtStatus* s = g_api->KernelContext_GetOutput(ctx, 0, u.shape.data(), u.shape.size(), &y)) return s;
  void* out = nullptr;
  if (OrtStatus* s = g_api->GetTensorMutableData(y, &out)) return s;
  if (batch * dim * L == 0) return nullptr;

  const ScanArgs<float> a{u.data, delta.data, bias.data, k.softplus != 0, Ap.data(), Bp.data(), Cp.data(),
                          D.data, z.data, static_cast<float*>(out), nullptr, dim, L, N, Np, Bvar, Cvar, GB, GC,
                          /*allow_narrow=*/true};
  // one task per row (wide) or per lane-width group of channels (narrow), on ONNX Runtime's
  // intra-op threads: the session's intra_op_num_threads applies
  const bool narrow = use_narrow(a);
  const Work w{&a, dim, dim / K};
  const size_t units = static_cast<size_t>(narrow ? batch * (dim / K) : batch * dim);
  return g_api->KernelContext_ParallelFor(ctx, narrow ? narrow_unit : wide_unit, units, 0,
                                          const_cast<Work*>(&w));
}

// ------------------------------------------------------------------ OrtCustomOp callbacks

OrtStatusPtr ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                        void** kernel) {
  auto* k = new Kernel();
  if (OrtStatus* s = api->KernelInfoGetAttribute_int64(info, "delta_softplus", &k->softplus)) {
    api->ReleaseStatus(s);  // absent: default 0
    k->softplus = 0;
  }
  *kernel = k;
  return nullptr;
}

OrtStatusPtr ORT_API_CALL kernel_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    return compute(*static_cast<Kernel*>(kernel), ctx);
  } catch (const std::exception& e) {  // std::bad_alloc: no exception may cross the C API
    return g_api->CreateStatus(ORT_FAIL, (std::string("edgediag::SelectiveScan: ") + e.what()).c_str());
  }
}

void ORT_API_CALL kernel_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "SelectiveScan"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 8; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t index) {
  return index == 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;  // z
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 1 << 30; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));  // fields above kApiLevel stay null
  op.version = kApiLevel;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = float_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = float_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = kernel_destroy;
  op.GetInputCharacteristic = input_kind;
  op.GetOutputCharacteristic = output_kind;
  op.GetInputMemoryType = input_memory;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = kernel_compute;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

const OrtCustomOp kSelectiveScan = make_op();

}  // namespace

// ONNX Runtime's entry point for register_custom_ops_library(). The domain must outlive every
// session made with these options, which the library cannot see: it is kept for the process.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(
    OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(kApiLevel);
  if (g_api == nullptr) {
    std::fprintf(stderr, "edgediag::SelectiveScan needs ONNX Runtime 1.17 or newer\n");
    return nullptr;  // no API to build a status with; the session then reports the unknown op
  }
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = g_api->CreateCustomOpDomain("edgediag", &domain)) return s;
  if (OrtStatus* s = g_api->CustomOpDomain_Add(domain, &kSelectiveScan)) return s;
  return g_api->AddCustomOpDomain(options, domain);
}
