// edgetune's ONNX Runtime custom ops: a frozen NF4 (bitsandbytes layout) matmul and its
// input gradient, both computed from the packed 4-bit weight without ever holding the dense
// weight: each kernel decodes a tile of TILE_O weight rows at a time into a small buffer.
//
//   edgetune::NF4MatMul(x (..., K) f32, packed (N*K/2) u8, absmax (N*K/bs) f32) -> y (..., N) f32
//       y = x @ W^T, W[o, i] = NF4[code(o*K + i)] * absmax[(o*K + i) / bs]
//   edgetune::NF4MatMulGrad(dy (..., N) f32, packed, absmax) -> dx (..., K) f32
//       dx = dy @ W
//
// Sizes come from the inputs, not from attributes, so one gradient definition (registered in
// Python before the training artifacts are generated) fits every layer: N*K = 2 * len(packed),
// K (forward) or N (backward) is the last dim of the first input, and bs = N*K / len(absmax).
// The code order is bitsandbytes': element 2j in the high nibble of byte j, 2j+1 in the low one.
// A call whose shapes do not fit fills its output with NaN, which the training loop reports as a
// non-finite loss (a V1 kernel has no way to return an error status).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ort_abi.h"

namespace {

using namespace et_ort;

constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr int64_t TILE_O = 16;   // weight rows decoded at once
constexpr int64_t TILE_M = 64;   // activation rows that share one decoded tile

const OrtApi* g_api = nullptr;

struct Tensor {
  void* data = nullptr;
  std::vector<int64_t> dims;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

bool read_input(OrtKernelContext* ctx, size_t i, Tensor* t) {
  using GetInput = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
  using GetShape = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
  using GetCount = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
  using GetDims = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
  using GetData = OrtStatus* (*)(OrtValue*, void**);
  using ReleaseInfo = void (*)(OrtTensorTypeAndShapeInfo*);
  using ReleaseStatus = void (*)(OrtStatus*);
  auto failed = [](OrtStatus* s) {
    if (s) slot<ReleaseStatus>(g_api, kReleaseStatus)(s);
    return s != nullptr;
  };
  const OrtValue* value = nullptr;
  if (failed(slot<GetInput>(g_api, kKernelContextGetInput)(ctx, i, &value)) || !value) return false;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (failed(slot<GetShape>(g_api, kGetTensorTypeAndShape)(value, &info))) return false;
  size_t n = 0;
  bool ok = !failed(slot<GetCount>(g_api, kGetDimensionsCount)(info, &n));
  if (ok) {
    t->dims.assign(n, 0);
    ok = n == 0 || !failed(slot<GetDims>(g_api, kGetDimensions)(info, t->dims.data(), n));
  }
  slot<ReleaseInfo>(g_api, kReleaseTensorTypeAndShapeInfo)(info);
  return ok && !failed(slot<GetData>(g_api, kGetTensorMutableData)(const_cast<OrtValue*>(value), &t->data));
}

float* make_output(OrtKernelContext* ctx, const std::vector<int64_t>& dims) {
  using GetOutput = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
  using GetData = OrtStatus* (*)(OrtValue*, void**);
  using ReleaseStatus = void (*)(OrtStatus*);
  OrtValue* out = nullptr;
  OrtStatus* s = slot<GetOutput>(g_api, kKernelContextGetOutput)(ctx, 0, dims.data(), dims.size(), &out);
  if (s) { slot<ReleaseStatus>(g_api, kReleaseStatus)(s); return nullptr; }
  void* data = nullptr;
  s = slot<GetData>(g_api, kGetTensorMutableData)(out, &data);
  if (s) { slot<ReleaseStatus>(g_api, kReleaseStatus)(s); return nullptr; }
  return static_cast<float*>(data);
}

// Decode weight rows [o0, o0 + rows) (each K values) into buf (rows * K floats).
void decode_rows(const uint8_t* packed, const float* absmax, int64_t K, int64_t bs, int64_t o0, int64_t rows,
                 float* buf) {
  const int64_t e0 = o0 * K, e1 = (o0 + rows) * K;  // element range; K*o0 is even because N*K is
  for (int64_t e = e0; e < e1;) {
    const int64_t block_end = std::min(e1, (e / bs + 1) * bs);
    const float s = absmax[e / bs];
    float* w = buf + (e - e0);
    const uint8_t* p = packed + (e >> 1);
    int64_t n = block_end - e;
    if (e & 1) {  // start on a low nibble (only when K is odd)
      *w++ = kNF4[*p++ & 15] * s;
      --n;
    }
    for (int64_t j = 0; j + 1 < n; j += 2, ++p) {
      w[j] = kNF4[*p >> 4] * s;
      w[j + 1] = kNF4[*p & 15] * s;
    }
    if (n & 1) w[n - 1] = kNF4[*p >> 4] * s;
    e = block_end;
  }
}

struct Shapes {
  int64_t M, K, N, bs;
};

// First input (..., last) with last = K (forward) or N (backward); fills in the rest.
bool shapes(const Tensor& a, const Tensor& packed, const Tensor& absmax, bool forward, Shapes* s) {
  if (a.dims.empty() || packed.dims.size() != 1 || absmax.dims.size() != 1) return false;
  const int64_t last = a.dims.back();
  const int64_t numel = 2 * packed.dims[0], nb = absmax.dims[0];
  if (last <= 0 || nb <= 0 || numel % last || numel % nb) return false;
  s->M = last ? a.numel() / last : 0;
  if (forward) { s->K = last; s->N = numel / last; } else { s->N = last; s->K = numel / last; }
  s->bs = numel / nb;
  return s->bs % 2 == 0;
}

void fill_nan(float* y, int64_t n) {
  std::fill(y, y + n, std::numeric_limits<float>::quiet_NaN());
}

// y (M, N) = x (M, K) @ W^T
void nf4_forward(const float* x, const uint8_t* packed, const float* absmax, const Shapes& s, float* y) {
  std::vector<float> buf(TILE_O * s.K);
  for (int64_t m0 = 0; m0 < s.M; m0 += TILE_M) {
    const int64_t m1 = std::min(s.M, m0 + TILE_M);
    for (int64_t o0 = 0; o0 < s.N; o0 += TILE_O) {
      const int64_t rows = std::min(TILE_O, s.N - o0);
      decode_rows(packed, absmax, s.K, s.bs, o0, rows, buf.data());
      for (int64_t m = m0; m < m1; ++m) {
        const float* xm = x + m * s.K;
        for (int64_t t = 0; t < rows; ++t) {
          const float* w = buf.data() + t * s.K;
          float acc = 0.f;
          for (int64_t i = 0; i < s.K; ++i) acc += xm[i] * w[i];
          y[m * s.N + o0 + t] = acc;
        }
      }
    }
  }
}

// dx (M, K) = dy (M, N) @ W
void nf4_backward(const float* dy, const uint8_t* packed, const float* absmax, const Shapes& s, float* dx) {
  std::fill(dx, dx + s.M * s.K, 0.f);
  std::vector<float> buf(TILE_O * s.K);
  for (int64_t m0 = 0; m0 < s.M; m0 += TILE_M) {
    const int64_t m1 = std::min(s.M, m0 + TILE_M);
    for (int64_t o0 = 0; o0 < s.N; o0 += TILE_O) {
      const int64_t rows = std::min(TILE_O, s.N - o0);
      decode_rows(packed, absmax, s.K, s.bs, o0, rows, buf.data());
      for (int64_t m = m0; m < m1; ++m) {
        float* dxm = dx + m * s.K;
        const float* dym = dy + m * s.N + o0;
        for (int64_t t = 0; t < rows; ++t) {
          const float a = dym[t];
          const float* w = buf.data() + t * s.K;
          for (int64_t i = 0; i < s.K; ++i) dxm[i] += a * w[i];
        }
      }
    }
  }
}

template <bool Forward>
void compute(void* /*kernel*/, OrtKernelContext* ctx) {
  Tensor a, packed, absmax;
  Shapes s{};
  const bool ok = read_input(ctx, 0, &a) && read_input(ctx, 1, &packed) && read_input(ctx, 2, &absmax) &&
                  shapes(a, packed, absmax, Forward, &s);
  std::vector<int64_t> dims = a.dims;
  if (!dims.empty()) dims.back() = ok ? (Forward ? s.N : s.K) : dims.back();
  float* out = make_output(ctx, dims);
  if (!out) return;
  if (!ok) { fill_nan(out, a.numel()); return; }
  const auto* p = static_cast<const uint8_t*>(packed.data);
  const auto* am = static_cast<const float*>(absmax.data);
  if (Forward) nf4_forward(static_cast<const float*>(a.data), p, am, s, out);
  else nf4_backward(static_cast<const float*>(a.data), p, am, s, out);
}

void* create_kernel(const EtCustomOp*, const OrtApi*, const OrtKernelInfo*) {
  static int token = 0;  // the kernels are stateless
  return &token;
}
void destroy_kernel(void*) {}
const char* fwd_name(const EtCustomOp*) { return "NF4MatMul"; }
const char* bwd_name(const EtCustomOp*) { return "NF4MatMulGrad"; }
const char* cpu_provider(const EtCustomOp*) { return nullptr; }  // nullptr: the CPU provider
int input_type(const EtCustomOp*, size_t i) { return i == 1 ? ET_UINT8 : ET_FLOAT; }
size_t three(const EtCustomOp*) { return 3; }
int output_type(const EtCustomOp*, size_t) { return ET_FLOAT; }
size_t one(const EtCustomOp*) { return 1; }
int required(const EtCustomOp*, size_t) { return 0; }
int default_memory(const EtCustomOp*, size_t) { return 0; }
int one_arity(const EtCustomOp*) { return 1; }
int homogeneous(const EtCustomOp*) { return 1; }

EtCustomOp make_op(const char* (*name)(const EtCustomOp*), void (*kernel)(void*, OrtKernelContext*)) {
  EtCustomOp op{};
  op.version = 14;
  op.CreateKernel = create_kernel;
  op.GetName = name;
  op.GetExecutionProviderType = cpu_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = three;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = one;
  op.KernelCompute = kernel;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = default_memory;
  op.GetVariadicInputMinArity = one_arity;
  op.GetVariadicInputHomogeneity = homogeneous;
  op.GetVariadicOutputMinArity = one_arity;
  op.GetVariadicOutputHomogeneity = homogeneous;
  return op;
}

EtCustomOp g_forward = make_op(fwd_name, compute<true>);
EtCustomOp g_backward = make_op(bwd_name, compute<false>);

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* base) {
  using CreateDomain = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
  using DomainAdd = OrtStatus* (*)(OrtCustomOpDomain*, const EtCustomOp*);
  using AddDomain = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);
  g_api = base->GetApi(14);  // the oldest table that has every slot used here
  if (!g_api) return nullptr;
  static OrtCustomOpDomain* domain = nullptr;  // lives as long as the process: sessions reference it
  OrtStatus* s = nullptr;
  if (!domain && (s = slot<CreateDomain>(g_api, kCreateCustomOpDomain)("edgetune", &domain))) return s;
  static bool added = false;
  if (!added) {
    if ((s = slot<DomainAdd>(g_api, kCustomOpDomainAdd)(domain, &g_forward))) return s;
    if ((s = slot<DomainAdd>(g_api, kCustomOpDomainAdd)(domain, &g_backward))) return s;
    added = true;
  }
  return slot<AddDomain>(g_api, kAddCustomOpDomain)(options, domain);
}
