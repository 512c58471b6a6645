// Fused LoRA branch: y += scale · (x·Aᵀ)·Bᵀ in y's own buffer, and its backward.
//
// Why: the branch's (..., out) result, its scaled copy and the sum are three (..., out)
// temporaries in eager torch; here the rank-r product h = x·Aᵀ (N, r) is the only new tensor
// and the update is one BLAS addmm_ into y (scale as its alpha). Backward likewise adds
// scale·(dY·B)·A into an existing grad_x buffer with addmm_.
//
// Dtypes: h is computed in A's dtype (x cast to it, as the LoRA layer does); the update runs in
// y's dtype (the small h and B are cast when they differ). A and B share a dtype.
#include "common.h"
#include "lora_impl.h"

namespace edgetune_cpu {

at::Tensor lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale) {
  ET_CHECK_CPU(y);
  return edgetune_lora::lora_add_(y, x, A, B, scale);
}

std::tuple<at::Tensor, at::Tensor> lora_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                                                 const at::Tensor& A, const at::Tensor& B, double scale,
                                                 const c10::optional<at::Tensor>& grad_x) {
  ET_CHECK_CPU(dy);
  return edgetune_lora::lora_backward(dy, x, h, A, B, scale, grad_x);
}

}  // namespace edgetune_cpu

TORCH_LIBRARY_FRAGMENT(edgetune_cpu, m) {
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, float scale) -> Tensor");
  m.def("lora_backward(Tensor dy, Tensor x, Tensor h, Tensor A, Tensor B, float scale, Tensor(b!)? grad_x) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(edgetune_cpu, CPU, m) {
  m.impl("lora_add_", &edgetune_cpu::lora_add_);
  m.impl("lora_backward", &edgetune_cpu::lora_backward);
}
