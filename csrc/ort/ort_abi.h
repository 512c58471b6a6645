// The small part of the ONNX Runtime C ABI (API version 1.19) that edgetune's custom-op library uses.
//
// The onnxruntime-training wheel ships no C headers, so this file declares, in edgetune's own
// words, only what the library touches: opaque handle types, the two element types it uses, the
// entry-point struct OrtApiBase, the layout of OrtCustomOp up to ABI version 14, and the slot
// numbers of the handful of OrtApi function pointers it calls. OrtApi is an append-only table of
// function pointers, so a slot number never changes between releases; tests/ort/test_custom_op.py
// checks every slot used here by running the ops against torch.
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {

struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtApi;  // used only as an opaque table of function pointers

enum EtElementType : int { ET_FLOAT = 1, ET_UINT8 = 2 };  // ONNXTensorElementDataType values

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// ABI version 14 layout: ORT reads the fields past GetInputMemoryType only when version >= 14.
struct EtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const EtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const EtCustomOp* op);
  const char* (*GetExecutionProviderType)(const EtCustomOp* op);
  int (*GetInputType)(const EtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const EtCustomOp* op);
  int (*GetOutputType)(const EtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const EtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const EtCustomOp* op, size_t index);   // 0: required
  int (*GetOutputCharacteristic)(const EtCustomOp* op, size_t index);  // 0: required
  int (*GetInputMemoryType)(const EtCustomOp* op, size_t index);       // 0: the EP's default
  int (*GetVariadicInputMinArity)(const EtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const EtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const EtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const EtCustomOp* op);
};

}  // extern "C"

namespace et_ort {

// Slots of OrtApi (index of the function pointer in the table).
enum Slot : size_t {
  kCreateStatus = 0,                   // OrtStatus* (int code, const char* msg)
  kCreateCustomOpDomain = 26,          // (const char* domain, OrtCustomOpDomain** out)
  kCustomOpDomainAdd = 27,             // (OrtCustomOpDomain*, const OrtCustomOp*)
  kAddCustomOpDomain = 28,             // (OrtSessionOptions*, OrtCustomOpDomain*)
  kGetTensorMutableData = 51,          // (OrtValue*, void** out)
  kGetDimensionsCount = 61,            // (const OrtTensorTypeAndShapeInfo*, size_t* out)
  kGetDimensions = 62,                 // (const OrtTensorTypeAndShapeInfo*, int64_t* dims, size_t n)
  kGetTensorTypeAndShape = 65,         // (const OrtValue*, OrtTensorTypeAndShapeInfo** out)
  kKernelContextGetInput = 90,         // (const OrtKernelContext*, size_t i, const OrtValue** out)
  kKernelContextGetOutput = 91,        // (OrtKernelContext*, size_t i, const int64_t* dims, size_t n, OrtValue** out)
  kReleaseStatus = 93,                 // void (OrtStatus*)
  kReleaseTensorTypeAndShapeInfo = 99, // void (OrtTensorTypeAndShapeInfo*)
};

template <typename Fn>
inline Fn slot(const OrtApi* api, Slot s) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[s]);
}

}  // namespace et_ort
