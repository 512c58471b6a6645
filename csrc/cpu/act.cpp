// act4 (fused forward + 4-bit derivative-code packing), nibble and 1-bit (un)packing.
#include "common.h"
#include "simd.h"

#include <type_traits>

namespace edgetune_cpu {

enum ActOp : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

static inline float act_forward(float x, int64_t op) {
  if (op == kSilu) return x / (1.0f + std::exp(-x));
  if (op == kGelu) return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752440f));
  const float k = 0.79788456080286535588f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

// y = f(x) and nibble-packed codes bucketize(x, borders) (element 2i in the low nibble).
static at::Tensor act_value(const at::Tensor& x, int64_t op) {
  if (op == kSilu) return at::silu(x);
  return at::gelu(x, op == kGelu ? "none" : "tanh");
}

// Nibble codes of x[0, n) (n even unless it is the tensor's end) into dst[0, ceil(n/2)).
static void codes_portable_or_simd(const float* x, int64_t n, const float* b, int nb, uint8_t* dst, bool simd) {
#if ET_HAVE_AVX2_PATH
  if (simd) return act4_codes_avx2(x, n, b, nb, dst);
#endif
  (void)simd;
  for (int64_t i = 0; i < n; i += 2) {
    int c0 = 0, c1 = 0;
    for (int k = 0; k < nb; ++k) c0 += !(b[k] >= x[i]);  // NaN counts every border, as torch.bucketize
    if (i + 1 < n)
      for (int k = 0; k < nb; ++k) c1 += !(b[k] >= x[i + 1]);
    dst[i / 2] = static_cast<uint8_t>(c0 | (c1 << 4));
  }
}

// y = f(x) and nibble-packed codes bucketize(x, borders) (element 2i in the low nibble).
// f(x) uses ATen's vectorised kernel (SLEEF); the codes are one branch-free pass over x.
std::tuple<at::Tensor, at::Tensor> act4_forward(const at::Tensor& x_, const at::Tensor& borders_, int64_t op) {
  ET_CHECK_CPU(x_);
  TORCH_CHECK(op >= 0 && op <= 2, "act4_forward: unknown op id ", op);
  auto x = x_.contiguous();
  auto borders = borders_.to(at::kFloat).contiguous();
  const int nb = static_cast<int>(borders.numel());
  TORCH_CHECK(nb <= 15, "act4_forward: at most 15 borders (4-bit codes)");
  const int64_t n = x.numel();
  auto y = act_value(x, op);
  auto packed = at::empty({(n + 1) / 2}, x.options().dtype(at::kByte));
  float b[15];
  for (int i = 0; i < nb; ++i) b[i] = borders.data_ptr<float>()[i];
  uint8_t* pp = packed.data_ptr<uint8_t>();
  const bool simd = has_avx2();
  // parallel over output bytes; each chunk covers elements [2 p0, min(2 p1, n)), in blocks of
  // kBlock converted to float32 first when x is not float32 (x.float() of the reference)
  constexpr int64_t kBlock = 1024;
  ET_DISPATCH_FLOATS(x.scalar_type(), "act4_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 1) / 2, kGrain / 2, [&](int64_t p0, int64_t p1) {
      const int64_t e_end = std::min(2 * p1, n);
      float buf[kBlock];
      for (int64_t e = 2 * p0; e < e_end; e += kBlock) {
        const int64_t m = std::min(kBlock, e_end - e);
        const float* src;
        if constexpr (std::is_same_v<scalar_t, float>) {
          src = reinterpret_cast<const float*>(xp) + e;
        } else {
          for (int64_t j = 0; j < m; ++j) buf[j] = static_cast<float>(xp[e + j]);
          src = buf;
        }
        codes_portable_or_simd(src, m, b, nb, pp + e / 2, simd);
      }
    });
  });
  return {y, packed};
}

// grad * levels[code], levels cast to grad's dtype first (exactly the reference's rounding).
at::Tensor act4_backward(const at::Tensor& grad_, const at::Tensor& packed_, const at::Tensor& levels_) {
  ET_CHECK_CPU(grad_);
  auto grad = grad_.contiguous();
  auto packed = packed_.contiguous();
  const int64_t n = grad.numel();
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "act4_backward: packed holds ", packed.numel(),
              " bytes, expected ", (n + 1) / 2);
  TORCH_CHECK(levels_.numel() <= 16, "act4_backward: at most 16 levels");
  auto out = at::empty_like(grad);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  ET_DISPATCH_FLOATS(grad.scalar_type(), "act4_backward", [&] {
    auto lv_t = levels_.to(grad.scalar_type()).to(at::kFloat).contiguous();
    float lv[16] = {0};
    for (int64_t k = 0; k < lv_t.numel(); ++k) lv[k] = lv_t.data_ptr<float>()[k];
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool simd = has_avx2();
    // chunks start at even elements so each begins on a byte boundary
    at::parallel_for(0, (n + 1) / 2, kGrain / 2, [&](int64_t p0, int64_t p1) {
      const int64_t e0 = 2 * p0, e1 = std::min(2 * p1, n);
#if ET_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (simd) return act4_backward_avx2(reinterpret_cast<const float*>(gp) + e0, pp + p0, lv, e1 - e0,
                                            reinterpret_cast<float*>(op) + e0);
      }
#endif
      (void)simd;
      for (int64_t e = e0; e < e1; ++e) {
        const uint8_t byte = pp[e >> 1];
        const uint8_t c = (e & 1) ? (byte >> 4) : (byte & 0x0F);
        op[e] = static_cast<scalar_t>(static_cast<float>(gp[e]) * lv[c]);
      }
    });
  });
  return out;
}

at::Tensor pack_nibbles(const at::Tensor& codes_) {
  ET_CHECK_CPU(codes_);
  auto codes = codes_.to(at::kByte).contiguous();
  const int64_t n = codes.numel();
  auto out = at::empty({(n + 1) / 2}, codes.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t full = n / 2;
  at::parallel_for(0, full, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) op[i] = static_cast<uint8_t>(cp[2 * i] | (cp[2 * i + 1] << 4));
  });
  if (n % 2) op[full] = cp[n - 1];
  return out;
}

at::Tensor unpack_nibbles(const at::Tensor& packed_, int64_t numel) {
  ET_CHECK_CPU(packed_);
  auto packed = packed_.contiguous();
  TORCH_CHECK(numel >= 0 && packed.numel() * 2 >= numel, "unpack_nibbles: too few bytes for ", numel, " codes");
  auto out = at::empty({numel}, packed.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, numel, kGrain, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) op[e] = (e & 1) ? (pp[e >> 1] >> 4) : (pp[e >> 1] & 0x0F);
  });
  return out;
}

// bool mask -> bits, element 8i+j in bit j of byte i.
at::Tensor pack_bits(const at::Tensor& mask_) {
  ET_CHECK_CPU(mask_);
  auto mask = mask_.to(at::kBool).contiguous();
  const int64_t n = mask.numel();
  const int64_t nbytes = (n + 7) / 8;
  auto out = at::empty({nbytes}, mask.options().dtype(at::kByte));
  const bool* mp = mask.data_ptr<bool>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, nbytes, kGrain / 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = 8 * i;
      const int m = static_cast<int>(std::min<int64_t>(8, n - e));
      uint8_t byte = 0;
      for (int j = 0; j < m; ++j) byte |= static_cast<uint8_t>(mp[e + j] ? 1 : 0) << j;
      op[i] = byte;
    }
  });
  return out;
}

at::Tensor unpack_bits(const at::Tensor& packed_, int64_t numel) {
  ET_CHECK_CPU(packed_);
  auto packed = packed_.contiguous();
  TORCH_CHECK(numel >= 0 && packed.numel() * 8 >= numel, "unpack_bits: too few bytes for ", numel, " bits");
  auto out = at::empty({numel}, packed.options().dtype(at::kBool));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  bool* op = out.data_ptr<bool>();
  at::parallel_for(0, numel, kGrain, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) op[e] = (pp[e >> 3] >> (e & 7)) & 1;
  });
  return out;
}

}  // namespace edgetune_cpu

TORCH_LIBRARY_FRAGMENT(edgetune_cpu, m) {
  m.def("act4_forward(Tensor x, Tensor borders, int op) -> (Tensor, Tensor)");
  m.def("act4_backward(Tensor grad, Tensor packed, Tensor levels) -> Tensor");
  m.def("pack_nibbles(Tensor codes) -> Tensor");
  m.def("unpack_nibbles(Tensor packed, int numel) -> Tensor");
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def("unpack_bits(Tensor packed, int numel) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgetune_cpu, CPU, m) {
  m.impl("act4_forward", &edgetune_cpu::act4_forward);
  m.impl("act4_backward", &edgetune_cpu::act4_backward);
  m.impl("pack_nibbles", &edgetune_cpu::pack_nibbles);
  m.impl("unpack_nibbles", &edgetune_cpu::unpack_nibbles);
  m.impl("pack_bits", &edgetune_cpu::pack_bits);
  m.impl("unpack_bits", &edgetune_cpu::unpack_bits);
}
