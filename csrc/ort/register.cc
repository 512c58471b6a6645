// RegisterCustomOps: the library's entry point. Adds every op that a kernel file declared with
// et_ort::Registered (nf4_matmul.cc, act4.cc) to the "edgetune" domain of the session options.
#include "kernel_io.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* base) {
  using namespace et_ort;
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
    for (const EtCustomOp* op : registry())
      if ((s = slot<DomainAdd>(g_api, kCustomOpDomainAdd)(domain, op))) return s;
    added = true;
  }
  return slot<AddDomain>(g_api, kAddCustomOpDomain)(options, domain);
}
