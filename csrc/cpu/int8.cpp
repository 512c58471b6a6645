// Per-group asymmetric 8-bit quantization (quant/actpack.py: quantize_int8_groups).
// Bit-exact with the reference: same float32 operations in the same order (built with
// -ffp-contract=off so no FMA changes a rounding), round-half-to-even via nearbyint, the last
// group zero-padded (the padding takes part in min/max, as in the reference).
#include "common.h"
#include "simd.h"

#include <type_traits>
#include <vector>

namespace edgetune_cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x_, int64_t group,
                                                             const c10::optional<at::Tensor>& noise_) {
  ET_CHECK_CPU(x_);
  TORCH_CHECK(group > 0, "quantize_int8: group must be positive");
  auto x = x_.contiguous();
  const int64_t n = x.numel();
  const int64_t G = (n + group - 1) / group;
  auto codes = at::empty({G, group}, x.options().dtype(at::kByte));
  auto lo = at::empty({G, 1}, x.options().dtype(at::kFloat));
  auto scale = at::empty({G, 1}, x.options().dtype(at::kFloat));
  const float* np = nullptr;
  at::Tensor noise;
  if (noise_.has_value()) {
    noise = noise_->to(at::kFloat).contiguous();
    TORCH_CHECK(noise.numel() == G * group, "quantize_int8: noise must have ", G * group, " elements");
    np = noise.data_ptr<float>();
  }
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* lp = lo.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_int8", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const bool simd = has_avx2() && group % 8 == 0;
    at::parallel_for(0, G, std::max<int64_t>(1, kGrain / group), [&](int64_t g0, int64_t g1) {
      std::vector<float> buf(group);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t base = g * group;
        const int64_t m = std::min(group, n - base);
        const float* v;
        if (std::is_same_v<scalar_t, float> && m == group) {
          v = reinterpret_cast<const float*>(xp + base);  // a full float32 group: read x in place
        } else {
          for (int64_t j = 0; j < m; ++j) buf[j] = static_cast<float>(xp[base + j]);
          for (int64_t j = m; j < group; ++j) buf[j] = 0.0f;  // the zero padding takes part in min/max
          v = buf.data();
        }
        const float* r = np ? np + base : nullptr;
        uint8_t* out = cp + base;
#if ET_HAVE_AVX2_PATH
        if (simd) {
          quant_group_avx2(v, group, r, out, lp + g, sp + g);
          continue;
        }
#endif
        float mn = v[0], mx = v[0];
        for (int64_t j = 1; j < group; ++j) {
          mn = std::min(mn, v[j]);
          mx = std::max(mx, v[j]);
        }
        const float s = (mx - mn) / 255.0f;
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        lp[g] = mn;
        sp[g] = s;
        if (r) {
          for (int64_t j = 0; j < group; ++j) {
            // v + r >= 0, so truncation is floor (and vectorises, unlike std::floor without SSE4.1)
            float q = static_cast<float>(static_cast<int32_t>((v[j] - mn) * inv + r[j]));
            q = std::min(std::max(q, 0.0f), 255.0f);
            out[j] = static_cast<uint8_t>(q);
          }
        } else {
          for (int64_t j = 0; j < group; ++j) {
            // round half to even for 0 <= t < 2^22: adding and subtracting 1.5 * 2^23 (default rounding mode)
            const float t = (v[j] - mn) * inv;
            float q = (t + 12582912.0f) - 12582912.0f;
            q = std::min(std::max(q, 0.0f), 255.0f);
            out[j] = static_cast<uint8_t>(q);
          }
        }
      }
    });
  });
  return {codes, lo, scale};
}

// codes * scale + lo in float32 (two roundings, as the reference), first `numel`, cast to dtype.
at::Tensor dequantize_int8(const at::Tensor& codes_, const at::Tensor& lo_, const at::Tensor& scale_,
                           int64_t numel, at::ScalarType dtype) {
  ET_CHECK_CPU(codes_);
  auto codes = codes_.contiguous();
  TORCH_CHECK(codes.dim() == 2, "dequantize_int8: codes must be (G, group)");
  const int64_t G = codes.size(0), group = codes.size(1);
  TORCH_CHECK(numel <= G * group, "dequantize_int8: numel exceeds the codes");
  auto lo = lo_.to(at::kFloat).contiguous();
  auto scale = scale_.to(at::kFloat).contiguous();
  TORCH_CHECK(lo.numel() == G && scale.numel() == G, "dequantize_int8: lo/scale must have G elements");
  auto out = at::empty({numel}, codes.options().dtype(dtype));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* lp = lo.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_int8", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, G, std::max<int64_t>(1, kGrain / group), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t base = g * group;
        const int64_t m = std::min(group, numel - base);
        const float s = sp[g], l = lp[g];
        const uint8_t* c = cp + base;
        scalar_t* o = op + base;
        for (int64_t j = 0; j < m; ++j) {
          const float t = static_cast<float>(c[j]) * s;
          o[j] = static_cast<scalar_t>(t + l);
        }
      }
    });
  });
  return out;
}

}  // namespace edgetune_cpu

TORCH_LIBRARY_FRAGMENT(edgetune_cpu, m) {
  m.def("quantize_int8(Tensor x, int group, Tensor? noise) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize_int8(Tensor codes, Tensor lo, Tensor scale, int numel, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgetune_cpu, CPU, m) {
  m.impl("quantize_int8", &edgetune_cpu::quantize_int8);
  m.impl("dequantize_int8", &edgetune_cpu::dequantize_int8);
}
