// Shared plumbing of edgetune's ORT custom ops: reading inputs, allocating outputs, and a small
// op table so every kernel file (nf4_matmul.cc, act4.cc) declares its ops the same way and
// register.cc adds them all to the "edgetune" domain.
//
// A V1 custom kernel cannot return an error status; a kernel whose inputs do not fit fills its
// float outputs with NaN, which the training loop reports as a non-finite loss.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "ort_abi.h"

namespace et_ort {

inline const OrtApi* g_api = nullptr;  // set by RegisterCustomOps

struct Tensor {
  void* data = nullptr;
  std::vector<int64_t> dims;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

inline bool failed(OrtStatus* s) {
  using ReleaseStatus = void (*)(OrtStatus*);
  if (s) slot<ReleaseStatus>(g_api, kReleaseStatus)(s);
  return s != nullptr;
}

inline bool read_input(OrtKernelContext* ctx, size_t i, Tensor* t) {
  using GetInput = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
  using GetShape = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
  using GetCount = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
  using GetDims = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
  using GetData = OrtStatus* (*)(OrtValue*, void**);
  using ReleaseInfo = void (*)(OrtTensorTypeAndShapeInfo*);
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

// Output `index` with shape `dims`; nullptr if ORT refused it.
inline void* make_output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& dims) {
  using GetOutput = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
  using GetData = OrtStatus* (*)(OrtValue*, void**);
  OrtValue* out = nullptr;
  if (failed(slot<GetOutput>(g_api, kKernelContextGetOutput)(ctx, index, dims.data(), dims.size(), &out))) return nullptr;
  void* data = nullptr;
  if (failed(slot<GetData>(g_api, kGetTensorMutableData)(out, &data))) return nullptr;
  return data;
}

inline void fill_nan(float* y, int64_t n) { std::fill(y, y + n, std::numeric_limits<float>::quiet_NaN()); }

// One custom op: EtCustomOp first (ORT sees only that), then what its callbacks read back.
struct EtOp {
  EtCustomOp base{};
  const char* name;
  std::vector<int> inputs, outputs;  // element types
  void (*kernel)(OrtKernelContext*);
};

namespace detail {
inline const EtOp* self(const EtCustomOp* op) { return reinterpret_cast<const EtOp*>(op); }
inline void* create_kernel(const EtCustomOp* op, const OrtApi*, const OrtKernelInfo*) {
  return const_cast<EtOp*>(self(op));  // stateless kernels: the op is the kernel
}
inline void destroy_kernel(void*) {}
inline const char* get_name(const EtCustomOp* op) { return self(op)->name; }
inline const char* cpu_provider(const EtCustomOp*) { return nullptr; }  // nullptr: the CPU provider
inline int input_type(const EtCustomOp* op, size_t i) { return self(op)->inputs[i]; }
inline size_t input_count(const EtCustomOp* op) { return self(op)->inputs.size(); }
inline int output_type(const EtCustomOp* op, size_t i) { return self(op)->outputs[i]; }
inline size_t output_count(const EtCustomOp* op) { return self(op)->outputs.size(); }
inline void compute(void* kernel, OrtKernelContext* ctx) { static_cast<EtOp*>(kernel)->kernel(ctx); }
inline int zero(const EtCustomOp*, size_t) { return 0; }  // required; the EP's default memory
inline int one(const EtCustomOp*) { return 1; }
}  // namespace detail

inline std::vector<const EtCustomOp*>& registry() {
  static std::vector<const EtCustomOp*> ops;
  return ops;
}

// A static EtOp + its registration: `static Registered op{"Name", {ET_FLOAT}, {ET_FLOAT}, kernel};`
struct Registered {
  EtOp op;
  Registered(const char* name, std::vector<int> inputs, std::vector<int> outputs, void (*kernel)(OrtKernelContext*)) {
    using namespace detail;
    op.name = name;
    op.inputs = std::move(inputs);
    op.outputs = std::move(outputs);
    op.kernel = kernel;
    EtCustomOp& b = op.base;
    b.version = 14;
    b.CreateKernel = create_kernel;
    b.GetName = get_name;
    b.GetExecutionProviderType = cpu_provider;
    b.GetInputType = input_type;
    b.GetInputTypeCount = input_count;
    b.GetOutputType = output_type;
    b.GetOutputTypeCount = output_count;
    b.KernelCompute = compute;
    b.KernelDestroy = destroy_kernel;
    b.GetInputCharacteristic = zero;
    b.GetOutputCharacteristic = zero;
    b.GetInputMemoryType = zero;
    b.GetVariadicInputMinArity = one;
    b.GetVariadicInputHomogeneity = one;
    b.GetVariadicOutputMinArity = one;
    b.GetVariadicOutputHomogeneity = one;
    registry().push_back(&op.base);
  }
};

}  // namespace et_ort
