// AVX2 inner loops for the bandwidth-bound ops, chosen at run time.
//
// Why runtime dispatch and not -march=native: the extension is built once at install time and
// may be copied to another x86 machine; functions here carry __attribute__((target("avx2")))
// and the callers test has_avx2() (cpuid, once). Other architectures (Jetson's aarch64) and
// x86 without AVX2 take the portable scalar loops, which -O3 auto-vectorises where it can.
//
// Bit-exactness: only IEEE single operations with one rounding each (sub, mul, add, compare,
// round-to-nearest-even, floor); no FMA (the file is built with -ffp-contract=off and no FMA
// intrinsic is used), so results match the torch references element for element.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ET_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define ET_HAVE_AVX2_PATH 0
#endif

namespace edgetune_cpu {

inline bool has_avx2() {
#if ET_HAVE_AVX2_PATH
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

#if ET_HAVE_AVX2_PATH
#define ET_AVX2 __attribute__((target("avx2")))

// 8 int32 in [0, 255] -> 8 bytes at dst.
ET_AVX2 static inline void store8_u8(uint8_t* dst, __m256i v) {
  __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(p16, p16));
}

// #{k < NB : !(b[k] >= v)} per lane: torch.bucketize(v, b, right=False) for ascending b
// (a NaN counts every border, as torch's lower_bound does).
template <int NB>
ET_AVX2 static inline __m256i count_below(const __m256* bv, int nb, __m256 v) {
  __m256i c = _mm256_setzero_si256();
  const int n = NB > 0 ? NB : nb;
  for (int k = 0; k < n; ++k) c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(bv[k], v, _CMP_NGE_UQ)));
  return c;
}

// Nibble codes of x[0, n) into dst[0, ceil(n/2)) (element 2i in the low nibble), 32 per step.
template <int NB>
ET_AVX2 static void act4_codes_avx2_t(const float* x, int64_t n, const float* b, int nb, uint8_t* dst) {
  __m256 bv[15];
  for (int k = 0; k < nb; ++k) bv[k] = _mm256_set1_ps(b[k]);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i nib = _mm256_set1_epi16(0x1001);  // byte weights (1, 16): even + 16 * odd
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i c0 = count_below<NB>(bv, nb, _mm256_loadu_ps(x + i));
    const __m256i c1 = count_below<NB>(bv, nb, _mm256_loadu_ps(x + i + 8));
    const __m256i c2 = count_below<NB>(bv, nb, _mm256_loadu_ps(x + i + 16));
    const __m256i c3 = count_below<NB>(bv, nb, _mm256_loadu_ps(x + i + 24));
    // int32 -> bytes (lanes interleave; the dword permute restores element order)
    __m256i by = _mm256_packus_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
    by = _mm256_permutevar8x32_epi32(by, order);
    const __m256i pairs = _mm256_maddubs_epi16(by, nib);  // 16 x int16 = c[2j] + 16 c[2j+1]
    const __m128i out = _mm_packus_epi16(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i / 2), out);
  }
  for (; i < n; i += 2) {
    int c0 = 0, c1 = 0;
    for (int k = 0; k < nb; ++k) c0 += !(b[k] >= x[i]);
    if (i + 1 < n)
      for (int k = 0; k < nb; ++k) c1 += !(b[k] >= x[i + 1]);
    dst[i / 2] = static_cast<uint8_t>(c0 | (c1 << 4));
  }
}

static inline void act4_codes_avx2(const float* x, int64_t n, const float* b, int nb, uint8_t* dst) {
  if (nb == 15)
    act4_codes_avx2_t<15>(x, n, b, nb, dst);
  else
    act4_codes_avx2_t<0>(x, n, b, nb, dst);
}

// One int8 group of `group` floats (group % 8 == 0): lo/scale as the reference computes them,
// codes round-half-even((v - lo) * inv) or floor((v - lo) * inv + noise), clamped to [0, 255].
ET_AVX2 static inline void quant_group_avx2(const float* v, int64_t group, const float* noise, uint8_t* out,
                                            float* lo, float* scale) {
  __m256 mn = _mm256_loadu_ps(v), mx = mn;
  for (int64_t j = 8; j < group; j += 8) {
    const __m256 a = _mm256_loadu_ps(v + j);
    mn = _mm256_min_ps(mn, a);
    mx = _mm256_max_ps(mx, a);
  }
  __m128 m4 = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
  m4 = _mm_min_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_min_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  __m128 x4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  x4 = _mm_max_ps(x4, _mm_movehl_ps(x4, x4));
  x4 = _mm_max_ss(x4, _mm_shuffle_ps(x4, x4, 1));
  const float l = _mm_cvtss_f32(m4), h = _mm_cvtss_f32(x4);
  const float s = (h - l) / 255.0f;
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
  *lo = l;
  *scale = s;
  const __m256 lv = _mm256_set1_ps(l), iv = _mm256_set1_ps(inv);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
  for (int64_t j = 0; j < group; j += 8) {
    __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + j), lv), iv);
    t = noise ? _mm256_floor_ps(_mm256_add_ps(t, _mm256_loadu_ps(noise + j)))
              : _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm256_min_ps(_mm256_max_ps(t, zero), top);
    store8_u8(out + j, _mm256_cvttps_epi32(t));
  }
}

// out[e] = g[e] * lv[code(e)] for float32, codes nibble-packed (element 2i low); e0 even.
ET_AVX2 static inline void act4_backward_avx2(const float* g, const uint8_t* packed, const float* lv16,
                                              int64_t n, float* out) {
  const __m256 lo8 = _mm256_loadu_ps(lv16), hi8 = _mm256_loadu_ps(lv16 + 8);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i fifteen = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    int32_t four;
    __builtin_memcpy(&four, packed + e / 2, 4);
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four));     // b0 b1 b2 b3 ...
    bytes = _mm256_permutevar8x32_epi32(bytes, dup);                    // b0 b0 b1 b1 ...
    const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(bytes, shifts), fifteen);
    const __m256 a = _mm256_permutevar8x32_ps(lo8, c), b = _mm256_permutevar8x32_ps(hi8, c);
    const __m256 sel = _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, seven));
    _mm256_storeu_ps(out + e, _mm256_mul_ps(_mm256_loadu_ps(g + e), _mm256_blendv_ps(a, b, sel)));
  }
  for (; e < n; ++e) {
    const uint8_t byte = packed[e >> 1];
    out[e] = g[e] * lv16[(e & 1) ? (byte >> 4) : (byte & 0x0F)];
  }
}
#endif  // ET_HAVE_AVX2_PATH

}  // namespace edgetune_cpu
