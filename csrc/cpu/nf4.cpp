// NF4 frozen-weight matmuls (bitsandbytes layout, quant/nf4.py): y = x·Wᵀ and grad_x = dY·W.
// W (out, in) is dequantized TILE rows at a time into a small buffer and multiplied with BLAS;
// no full fp weight is ever allocated. First element of a byte in the HIGH nibble.
#include "common.h"

namespace edgetune_cpu {

static const float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr int64_t kTileElems = 1 << 16;  // ~256 KB of fp32 weight per tile

template <typename scalar_t>
static void dequant_rows(const uint8_t* pp, const float* ap, int64_t r0, int64_t r1, int64_t in_f,
                         int64_t blocksize, scalar_t* dst) {
  int shift = 0;
  while ((int64_t(1) << shift) < blocksize) ++shift;
  TORCH_CHECK((int64_t(1) << shift) == blocksize, "nf4: blocksize must be a power of two");
  at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      scalar_t* d = dst + (r - r0) * in_f;
      const int64_t e0 = r * in_f;
      for (int64_t c = 0; c < in_f; ++c) {
        const int64_t e = e0 + c;
        const uint8_t byte = pp[e >> 1];
        const uint8_t q = (e & 1) ? (byte & 0x0F) : (byte >> 4);
        d[c] = static_cast<scalar_t>(kNF4[q] * ap[e >> shift]);
      }
    }
  });
}

// transposed=false: x (M, in) -> x·Wᵀ (M, out). transposed=true: x = dY (M, out) -> dY·W (M, in).
at::Tensor nf4_matmul(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& absmax_, int64_t out_f,
                      int64_t in_f, int64_t blocksize, bool transposed) {
  ET_CHECK_CPU(x_);
  auto packed = packed_.contiguous();
  auto absmax = absmax_.to(at::kFloat).contiguous();
  TORCH_CHECK(packed.numel() == (out_f * in_f + 1) / 2, "nf4_matmul: packed size does not match the shape");
  TORCH_CHECK(absmax.numel() == (out_f * in_f + blocksize - 1) / blocksize, "nf4_matmul: absmax size mismatch");
  const int64_t k = transposed ? out_f : in_f;
  TORCH_CHECK(x_.size(-1) == k, "nf4_matmul: x's last dim must be ", k);
  auto lead = x_.sizes().vec();
  lead.pop_back();
  auto x = x_.reshape({-1, k}).contiguous();
  const int64_t tile = std::max<int64_t>(1, kTileElems / std::max<int64_t>(1, in_f));
  at::Tensor y;
  ET_DISPATCH_FLOATS(x.scalar_type(), "nf4_matmul", [&] {
    auto wt = at::empty({std::min(tile, out_f), in_f}, x.options());
    const uint8_t* pp = packed.data_ptr<uint8_t>();
    const float* ap = absmax.data_ptr<float>();
    if (!transposed) {
      y = at::empty({x.size(0), out_f}, x.options());
      for (int64_t r0 = 0; r0 < out_f; r0 += tile) {
        const int64_t r1 = std::min(out_f, r0 + tile);
        dequant_rows<scalar_t>(pp, ap, r0, r1, in_f, blocksize, wt.data_ptr<scalar_t>());
        y.narrow(1, r0, r1 - r0).copy_(at::mm(x, wt.narrow(0, 0, r1 - r0).t()));
      }
    } else {
      // accumulate the k-split partial products in float32 (or double), cast once at the end
      const auto acc_t = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      auto acc = at::zeros({x.size(0), in_f}, x.options().dtype(acc_t));
      for (int64_t r0 = 0; r0 < out_f; r0 += tile) {
        const int64_t r1 = std::min(out_f, r0 + tile);
        dequant_rows<scalar_t>(pp, ap, r0, r1, in_f, blocksize, wt.data_ptr<scalar_t>());
        auto part = at::mm(x.narrow(1, r0, r1 - r0), wt.narrow(0, 0, r1 - r0));
        acc.add_(part);
      }
      y = acc.to(x.scalar_type());
    }
  });
  lead.push_back(transposed ? in_f : out_f);
  return y.view(lead);
}

}  // namespace edgetune_cpu

TORCH_LIBRARY_FRAGMENT(edgetune_cpu, m) {
  m.def("nf4_matmul(Tensor x, Tensor packed, Tensor absmax, int out_features, int in_features, int blocksize, "
        "bool transposed) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgetune_cpu, CPU, m) { m.impl("nf4_matmul", &edgetune_cpu::nf4_matmul); }
