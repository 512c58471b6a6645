// torch bindings of the CUDA kernels (kernels.cu) as torch.ops.edgetune_cuda.*; same schemas as
// the CPU ops (csrc/cpu). Built only by setup.py's CUDAExtension (a CUDA torch + nvcc).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"
#include "../cpu/lora_impl.h"  // the fused LoRA branch: ATen calls, cuBLAS on CUDA tensors

namespace bind {
using edgetune_cuda::DType;
using edgetune_cuda::kF32;
using edgetune_cuda::kF16;
using edgetune_cuda::kBF16;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "edgetune_cuda: unsupported dtype ", t.scalar_type(), " (float32/float16/bfloat16)");
  }
}

void check(cudaError_t e, const char* what) { TORCH_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e)); }
cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }
#define GUARD(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor"); c10::cuda::CUDAGuard guard_((t).device())

std::tuple<at::Tensor, at::Tensor> act4_forward(const at::Tensor& x_, const at::Tensor& borders, int64_t op) {
  GUARD(x_);
  auto x = x_.contiguous();
  auto b = borders.to(x.device(), at::kFloat).contiguous();
  auto y = at::empty_like(x);
  auto packed = at::empty({(x.numel() + 1) / 2}, x.options().dtype(at::kByte));
  check(edgetune_cuda::act4_forward(x.data_ptr(), y.data_ptr(), packed.data_ptr<uint8_t>(), x.numel(),
                                    b.data_ptr<float>(), static_cast<int>(b.numel()), static_cast<int>(op),
                                    dtype_of(x), stream()), "act4_forward");
  return {y, packed};
}

at::Tensor act4_backward(const at::Tensor& g_, const at::Tensor& packed, const at::Tensor& levels) {
  GUARD(g_);
  auto g = g_.contiguous();
  auto lv = at::zeros({16}, g.options().dtype(at::kFloat));
  lv.narrow(0, 0, levels.numel()).copy_(levels.to(g.device(), g.scalar_type()).to(at::kFloat));
  auto out = at::empty_like(g);
  check(edgetune_cuda::act4_backward(g.data_ptr(), packed.contiguous().data_ptr<uint8_t>(), lv.data_ptr<float>(),
                                     out.data_ptr(), g.numel(), dtype_of(g), stream()), "act4_backward");
  return out;
}

at::Tensor pack_nibbles(const at::Tensor& c_) {
  GUARD(c_);
  auto c = c_.to(at::kByte).contiguous();
  auto out = at::empty({(c.numel() + 1) / 2}, c.options());
  check(edgetune_cuda::pack_nibbles(c.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), c.numel(), stream()), "pack_nibbles");
  return out;
}

at::Tensor unpack_nibbles(const at::Tensor& p_, int64_t n) {
  GUARD(p_);
  auto p = p_.contiguous();
  TORCH_CHECK(p.numel() * 2 >= n, "unpack_nibbles: too few bytes");
  auto out = at::empty({n}, p.options());
  check(edgetune_cuda::unpack_nibbles(p.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, stream()), "unpack_nibbles");
  return out;
}

at::Tensor pack_bits(const at::Tensor& m_) {
  GUARD(m_);
  auto m = m_.to(at::kBool).contiguous();
  auto out = at::empty({(m.numel() + 7) / 8}, m.options().dtype(at::kByte));
  check(edgetune_cuda::pack_bits(m.data_ptr<bool>(), out.data_ptr<uint8_t>(), m.numel(), stream()), "pack_bits");
  return out;
}

at::Tensor unpack_bits(const at::Tensor& p_, int64_t n) {
  GUARD(p_);
  auto p = p_.contiguous();
  TORCH_CHECK(p.numel() * 8 >= n, "unpack_bits: too few bytes");
  auto out = at::empty({n}, p.options().dtype(at::kBool));
  check(edgetune_cuda::unpack_bits(p.data_ptr<uint8_t>(), out.data_ptr<bool>(), n, stream()), "unpack_bits");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x_, int64_t group,
                                                             const c10::optional<at::Tensor>& noise_) {
  GUARD(x_);
  auto x = x_.scalar_type() == at::kDouble ? x_.to(at::kFloat).contiguous() : x_.contiguous();
  const int64_t G = (x.numel() + group - 1) / group;
  auto codes = at::empty({G, group}, x.options().dtype(at::kByte));
  auto lo = at::empty({G, 1}, x.options().dtype(at::kFloat));
  auto scale = at::empty({G, 1}, x.options().dtype(at::kFloat));
  at::Tensor noise;
  if (noise_.has_value()) {
    noise = noise_->to(at::kFloat).contiguous();
    TORCH_CHECK(noise.numel() == G * group, "quantize_int8: noise must have G*group elements");
  }
  check(edgetune_cuda::quantize_int8(x.data_ptr(), x.numel(), static_cast<int>(group),
                                     noise.defined() ? noise.data_ptr<float>() : nullptr, codes.data_ptr<uint8_t>(),
                                     lo.data_ptr<float>(), scale.data_ptr<float>(), dtype_of(x), stream()),
        "quantize_int8");
  return {codes, lo, scale};
}

at::Tensor dequantize_int8(const at::Tensor& codes_, const at::Tensor& lo, const at::Tensor& scale, int64_t n,
                           at::ScalarType dtype) {
  GUARD(codes_);
  auto codes = codes_.contiguous();
  const bool dbl = dtype == at::kDouble;
  auto out = at::empty({n}, codes.options().dtype(dbl ? at::kFloat : dtype));
  check(edgetune_cuda::dequantize_int8(codes.data_ptr<uint8_t>(), lo.to(at::kFloat).contiguous().data_ptr<float>(),
                                       scale.to(at::kFloat).contiguous().data_ptr<float>(), n,
                                       static_cast<int>(codes.size(1)), out.data_ptr(), dtype_of(out), stream()),
        "dequantize_int8");
  return dbl ? out.to(at::kDouble) : out;
}

at::Tensor nf4_matmul(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& absmax_, int64_t out_f,
                      int64_t in_f, int64_t blocksize, bool transposed) {
  GUARD(x_);
  const int64_t k = transposed ? out_f : in_f;
  auto lead = x_.sizes().vec();
  lead.pop_back();
  auto x = x_.reshape({-1, k}).contiguous();
  auto packed = packed_.contiguous();
  auto absmax = absmax_.to(at::kFloat).contiguous();
  const int64_t tile = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, in_f));  // ~4M weights per tile
  auto wt = at::empty({std::min(tile, out_f), in_f}, x.options());
  at::Tensor y = transposed ? at::zeros({x.size(0), in_f}, x.options().dtype(at::kFloat))
                            : at::empty({x.size(0), out_f}, x.options());
  for (int64_t r0 = 0; r0 < out_f; r0 += tile) {
    const int64_t r1 = std::min(out_f, r0 + tile);
    check(edgetune_cuda::nf4_dequant_rows(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), r0, r1, in_f,
                                          blocksize, wt.data_ptr(), dtype_of(x), stream()), "nf4_dequant_rows");
    auto w = wt.narrow(0, 0, r1 - r0);
    if (transposed) {
      y.add_(at::mm(x.narrow(1, r0, r1 - r0), w));
    } else {
      y.narrow(1, r0, r1 - r0).copy_(at::mm(x, w.t()));
    }
  }
  if (transposed) y = y.to(x.scalar_type());
  lead.push_back(transposed ? in_f : out_f);
  return y.view(lead);
}

at::Tensor sketch_gather(const at::Tensor& table_, const at::Tensor& codes, int64_t bits, int64_t in_f) {
  GUARD(table_);
  auto table = table_.contiguous();
  auto w = at::empty({table.size(0), in_f}, table.options());
  check(edgetune_cuda::sketch_gather(table.data_ptr(), codes.contiguous().data_ptr<uint8_t>(), table.size(0), in_f,
                                     table.size(1), static_cast<int>(bits), w.data_ptr(), dtype_of(table), stream()),
        "sketch_gather");
  return w;
}

at::Tensor sketch_scatter_add(const at::Tensor& gw_, const at::Tensor& codes, int64_t bits, int64_t gpr) {
  GUARD(gw_);
  auto gw = gw_.contiguous();
  auto out = at::zeros({gw.size(0), gpr, int64_t(1) << bits}, gw.options().dtype(at::kFloat));
  check(edgetune_cuda::sketch_scatter_add(gw.data_ptr(), codes.contiguous().data_ptr<uint8_t>(), 0, gw.size(0),
                                          gw.size(1), gpr, static_cast<int>(bits), out.data_ptr<float>(), dtype_of(gw),
                                          stream()), "sketch_scatter_add");
  return out;
}

at::Tensor sketch_grad_table(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& codes_, int64_t bits,
                             int64_t gpr) {
  GUARD(dy_);
  const int64_t out_f = dy_.size(-1), in_f = x_.size(-1);
  auto dyt = dy_.reshape({-1, out_f}).t();
  auto x = x_.reshape({-1, in_f}).to(dy_.scalar_type());
  auto codes = codes_.contiguous();
  auto out = at::zeros({out_f, gpr, int64_t(1) << bits}, dy_.options().dtype(at::kFloat));
  const int64_t tile = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, in_f));
  for (int64_t r0 = 0; r0 < out_f; r0 += tile) {
    const int64_t r1 = std::min(out_f, r0 + tile);
    auto gw = at::mm(dyt.narrow(0, r0, r1 - r0), x).contiguous();
    check(edgetune_cuda::sketch_scatter_add(gw.data_ptr(), codes.data_ptr<uint8_t>(), r0, r1 - r0, in_f, gpr,
                                            static_cast<int>(bits), out.data_ptr<float>(), dtype_of(gw), stream()),
          "sketch_grad_table");
  }
  return out;
}

at::Tensor lora_add_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, double scale) {
  GUARD(y);
  return edgetune_lora::lora_add_(y, x, A, B, scale);
}

std::tuple<at::Tensor, at::Tensor> lora_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& h,
                                                 const at::Tensor& A, const at::Tensor& B, double scale,
                                                 const c10::optional<at::Tensor>& grad_x) {
  GUARD(dy);
  return edgetune_lora::lora_backward(dy, x, h, A, B, scale, grad_x);
}
}  // namespace bind

TORCH_LIBRARY(edgetune_cuda, m) {
  m.def("act4_forward(Tensor x, Tensor borders, int op) -> (Tensor, Tensor)");
  m.def("act4_backward(Tensor grad, Tensor packed, Tensor levels) -> Tensor");
  m.def("pack_nibbles(Tensor codes) -> Tensor");
  m.def("unpack_nibbles(Tensor packed, int numel) -> Tensor");
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def("unpack_bits(Tensor packed, int numel) -> Tensor");
  m.def("quantize_int8(Tensor x, int group, Tensor? noise) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize_int8(Tensor codes, Tensor lo, Tensor scale, int numel, ScalarType dtype) -> Tensor");
  m.def("nf4_matmul(Tensor x, Tensor packed, Tensor absmax, int out_features, int in_features, int blocksize, "
        "bool transposed) -> Tensor");
  m.def("sketch_gather(Tensor table, Tensor codes, int bits, int in_features) -> Tensor");
  m.def("sketch_scatter_add(Tensor grad_w, Tensor codes, int bits, int groups_per_row) -> Tensor");
  m.def("sketch_grad_table(Tensor dy, Tensor x, Tensor codes, int bits, int groups_per_row) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, float scale) -> Tensor");
  m.def("lora_backward(Tensor dy, Tensor x, Tensor h, Tensor A, Tensor B, float scale, Tensor(b!)? grad_x) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(edgetune_cuda, CUDA, m) {
  m.impl("act4_forward", &bind::act4_forward);
  m.impl("act4_backward", &bind::act4_backward);
  m.impl("pack_nibbles", &bind::pack_nibbles);
  m.impl("unpack_nibbles", &bind::unpack_nibbles);
  m.impl("pack_bits", &bind::pack_bits);
  m.impl("unpack_bits", &bind::unpack_bits);
  m.impl("quantize_int8", &bind::quantize_int8);
  m.impl("dequantize_int8", &bind::dequantize_int8);
  m.impl("nf4_matmul", &bind::nf4_matmul);
  m.impl("sketch_gather", &bind::sketch_gather);
  m.impl("sketch_scatter_add", &bind::sketch_scatter_add);
  m.impl("sketch_grad_table", &bind::sketch_grad_table);
  m.impl("lora_add_", &bind::lora_add_);
  m.impl("lora_backward", &bind::lora_backward);
}
