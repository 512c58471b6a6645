// NF4 frozen-weight matmuls (bitsandbytes layout, quant/nf4.py): y = x·Wᵀ and grad_x = dY·W.
//
// W (out, in) is dequantized one tile at a time into a small buffer (x's dtype) and multiplied
// with BLAS straight into the matching columns of y (mm_out into a column slice: BLAS's ldc, no
// copy); no full fp weight is ever allocated. x·Wᵀ tiles W by rows (a column block of y);
// dY·W tiles W by columns (again a column block of y, with the full K = out, so nothing is
// accumulated across tiles and y is written once in its own dtype).
// Tiles hold kTileElems weights (EDGETUNE_NF4_TILE overrides, for tuning) and at least 64 rows /
// columns so the GEMM stays efficient. Decoding: float32 NF4[q] * absmax[block], then cast to
// x's dtype (exactly the reference's rounding); AVX2 does 8 weights per step with two 8-entry
// register lookups. First element of a byte in the HIGH nibble.
#include "common.h"
#include "simd.h"

#include <cstdlib>
#include <type_traits>

namespace edgetune_cpu {

alignas(32) static const float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr int64_t kTileElems = 1 << 18;  // weights per tile: 1 MB of fp32 (measured: benchmarks/kernels.py)

// Tile extent along a dimension of length n: about `want` (>= 64), balanced so all tiles are
// equally large (a 455 + 121 split wastes the GEMM on the small one), a multiple of 16.
static int64_t balanced(int64_t n, int64_t want) {
  want = std::max<int64_t>(64, want);
  if (want >= n) return n;
  const int64_t tiles = (n + want - 1) / want;
  const int64_t t = ((n + tiles - 1) / tiles + 15) / 16 * 16;
  return std::min(n, t);
}

static int64_t tile_elems() {
  static const int64_t t = [] {
    const char* s = std::getenv("EDGETUNE_NF4_TILE");
    const long long v = s ? std::atoll(s) : 0;
    return v > 0 ? static_cast<int64_t>(v) : kTileElems;
  }();
  return t;
}

#if ET_HAVE_AVX2_PATH
// 8 weights from elements e .. e+7 (e even, all in one absmax block) -> 8 floats.
ET_AVX2 static inline __m256 nf4_decode8(const uint8_t* pp, int64_t e, float amax) {
  const __m256 lo8 = _mm256_load_ps(kNF4), hi8 = _mm256_load_ps(kNF4 + 8);
  int32_t four;
  __builtin_memcpy(&four, pp + (e >> 1), 4);
  __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four));
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)),
                                     _mm256_set1_epi32(15));
  const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, q), _mm256_permutevar8x32_ps(hi8, q),
                                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(q, _mm256_set1_epi32(7))));
  return _mm256_mul_ps(v, _mm256_set1_ps(amax));
}

ET_AVX2 static void nf4_decode_f32_avx2(const uint8_t* pp, const float* ap, int64_t e, int64_t len, int shift,
                                        float* dst) {
  const int64_t bs = int64_t(1) << shift;
  int64_t j = 0;
  while (j < len) {
    const int64_t ee = e + j;
    if ((ee & 1) == 0 && j + 8 <= len && (ee & (bs - 1)) + 8 <= bs) {
      _mm256_storeu_ps(dst + j, nf4_decode8(pp, ee, ap[ee >> shift]));
      j += 8;
    } else {
      const uint8_t byte = pp[ee >> 1];
      dst[j] = kNF4[(ee & 1) ? (byte & 0x0F) : (byte >> 4)] * ap[ee >> shift];
      ++j;
    }
  }
}
#endif

// Elements [e, e + len) of the flattened weight -> dst (x's dtype).
template <typename scalar_t>
static void nf4_decode(const uint8_t* pp, const float* ap, int64_t e, int64_t len, int shift, bool simd,
                       scalar_t* dst) {
#if ET_HAVE_AVX2_PATH
  if (simd) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      nf4_decode_f32_avx2(pp, ap, e, len, shift, dst);
    } else {
      float buf[512];
      for (int64_t j0 = 0; j0 < len; j0 += 512) {
        const int64_t m = std::min<int64_t>(512, len - j0);
        nf4_decode_f32_avx2(pp, ap, e + j0, m, shift, buf);
        for (int64_t j = 0; j < m; ++j) dst[j0 + j] = static_cast<scalar_t>(buf[j]);
      }
    }
    return;
  }
#endif
  (void)simd;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t ee = e + j;
    const uint8_t byte = pp[ee >> 1];
    dst[j] = static_cast<scalar_t>(kNF4[(ee & 1) ? (byte & 0x0F) : (byte >> 4)] * ap[ee >> shift]);
  }
}

// transposed=false: x (M, in) -> x·Wᵀ (M, out). transposed=true: x = dY (M, out) -> dY·W (M, in).
at::Tensor nf4_matmul(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& absmax_, int64_t out_f,
                      int64_t in_f, int64_t blocksize, bool transposed) {
  ET_CHECK_CPU(x_);
  auto packed = packed_.contiguous();
  auto absmax = absmax_.to(at::kFloat).contiguous();
  TORCH_CHECK(packed.numel() == (out_f * in_f + 1) / 2, "nf4_matmul: packed size does not match the shape");
  TORCH_CHECK(absmax.numel() == (out_f * in_f + blocksize - 1) / blocksize, "nf4_matmul: absmax size mismatch");
  int shift = 0;
  while ((int64_t(1) << shift) < blocksize) ++shift;
  TORCH_CHECK(blocksize > 0 && (int64_t(1) << shift) == blocksize, "nf4_matmul: blocksize must be a power of two");
  const int64_t k = transposed ? out_f : in_f;
  TORCH_CHECK(x_.size(-1) == k, "nf4_matmul: x's last dim must be ", k);
  auto lead = x_.sizes().vec();
  lead.pop_back();
  auto x = x_.reshape({-1, k}).contiguous();
  const int64_t M = x.size(0);
  const int64_t n_out = transposed ? in_f : out_f;
  auto y = at::empty({M, n_out}, x.options());
  const bool simd = has_avx2();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  ET_DISPATCH_FLOATS(x.scalar_type(), "nf4_matmul", [&] {
    if (!transposed) {
      // row tiles of W (T, in): y[:, r0:r1] = x · W[r0:r1]ᵀ
      const int64_t T = balanced(out_f, tile_elems() / std::max<int64_t>(1, in_f));
      auto wt = at::empty({T, in_f}, x.options());
      scalar_t* wp = wt.data_ptr<scalar_t>();
      for (int64_t r0 = 0; r0 < out_f; r0 += T) {
        const int64_t rows = std::min(T, out_f - r0);
        at::parallel_for(0, rows, 8, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) nf4_decode<scalar_t>(pp, ap, (r0 + r) * in_f, in_f, shift, simd, wp + r * in_f);
        });
        auto dst = y.narrow(1, r0, rows);
        at::mm_out(dst, x, wt.narrow(0, 0, rows).t());
      }
    } else {
      // column tiles of W (out, C): y[:, c0:c1] = dY · W[:, c0:c1]
      const int64_t C = balanced(in_f, tile_elems() / std::max<int64_t>(1, out_f));
      auto wt = at::empty({out_f, C}, x.options());
      scalar_t* wp = wt.data_ptr<scalar_t>();
      for (int64_t c0 = 0; c0 < in_f; c0 += C) {
        const int64_t cols = std::min(C, in_f - c0);
        at::parallel_for(0, out_f, 8, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) nf4_decode<scalar_t>(pp, ap, r * in_f + c0, cols, shift, simd, wp + r * cols);
        });
        auto dst = y.narrow(1, c0, cols);
        at::mm_out(dst, x, wt.view({-1}).narrow(0, 0, out_f * cols).view({out_f, cols}));
      }
    }
  });
  lead.push_back(n_out);
  return y.view(lead);
}

}  // namespace edgetune_cpu

TORCH_LIBRARY_FRAGMENT(edgetune_cpu, m) {
  m.def("nf4_matmul(Tensor x, Tensor packed, Tensor absmax, int out_features, int in_features, int blocksize, "
        "bool transposed) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgetune_cpu, CPU, m) { m.impl("nf4_matmul", &edgetune_cpu::nf4_matmul); }
