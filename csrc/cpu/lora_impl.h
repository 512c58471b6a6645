// The fused LoRA branch in plain ATen calls (BLAS addmm_ into existing buffers), shared by the
// CPU (csrc/cpu/lora.cpp) and CUDA (csrc/cuda/ops.cpp, cuBLAS) registrations. See lora.cpp.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace edgetune_lora {


inline at::Tensor rows2d(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// Adds m1·m2 (scaled by alpha) into t viewed as (N, cols); in place when t's layout allows a
// 2-D view, else through one temporary (still correct).
inline void addmm_into(const at::Tensor& t, const at::Tensor& m1, const at::Tensor& m2, double alpha) {
  const int64_t cols = t.size(-1);
  auto a = m1.scalar_type() == t.scalar_type() ? m1 : m1.to(t.scalar_type());
  auto b = m2.scalar_type() == t.scalar_type() ? m2 : m2.to(t.scalar_type());
  if (t.is_contiguous()) {
    auto t2 = t.view({-1, cols});
    t2.addmm_(a, b, 1.0, alpha);
  } else {
    t.add_(at::mm(a, b).view(t.sizes()), alpha);
  }
}

// y (..., out) += scale · (x (..., in) · Aᵀ) · Bᵀ, in place; returns h = x·Aᵀ (N, r) for backward.
inline at::Tensor lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && B.size(1) == A.size(0), "lora_add_: A must be (r, in) and B (out, r)");
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "lora_add_: A and B must share a dtype");
  TORCH_CHECK(x.size(-1) == A.size(1), "lora_add_: x's last dim must be in_features = ", A.size(1));
  TORCH_CHECK(y.size(-1) == B.size(0), "lora_add_: y's last dim must be out_features = ", B.size(0));
  TORCH_CHECK(x.numel() / x.size(-1) == y.numel() / y.size(-1), "lora_add_: x and y must have the same rows");
  auto x2 = rows2d(x);
  auto h = at::mm(x2.scalar_type() == A.scalar_type() ? x2 : x2.to(A.scalar_type()), A.t());  // (N, r)
  addmm_into(y, h, B.t(), scale);
  return h;
}

// dy (..., out), x (..., in), h = x·Aᵀ (N, r) -> (dA (r, in), dB (out, r)) in A's dtype;
// grad_x (..., in), when given, gets += scale · (dY·B)·A in place.
inline std::tuple<at::Tensor, at::Tensor> lora_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                                                 const at::Tensor& A, const at::Tensor& B, double scale,
                                                 const c10::optional<at::Tensor>& grad_x) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && B.size(1) == A.size(0), "lora_backward: A must be (r, in) and B (out, r)");
  const auto wt = A.scalar_type();
  auto g2 = rows2d(dy);
  if (g2.scalar_type() != wt) g2 = g2.to(wt);  // (N, out)
  auto x2 = rows2d(x);
  if (x2.scalar_type() != wt) x2 = x2.to(wt);  // (N, in)
  auto h2 = rows2d(h);
  auto dh = at::mm(g2, B).mul_(scale);  // (N, r) = s · dY · B
  auto dB = at::mm(g2.t(), h2).mul_(scale);  // (out, r)
  auto dA = at::mm(dh.t(), x2);  // (r, in)
  if (grad_x.has_value()) {
    addmm_into(*grad_x, dh, A, 1.0);
  }
  return {dA, dB};
}

}  // namespace edgetune_lora
