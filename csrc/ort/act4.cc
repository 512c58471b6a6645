// The 4-bit derivative-coded nonlinearity (S2A's Act4Pointwise) as ORT custom ops.
//
//   edgetune::Act4SiLU | Act4GELU | Act4GELUTanh (x f32, borders f32 (L-1), levels f32 (L))
//       -> y = f(x) f32 (x's shape), codes u8 (ceil(n/2))
//   edgetune::Act4Grad(dy f32, codes u8, levels f32 (L)) -> dx = levels[code] * dy (dy's shape)
//
// code(x) = #{borders < x} (torch.bucketize, right=False), L <= 16, packed two per byte as in
// edgetune.quant.actpack: element 2i in the low nibble of byte i, 2i+1 in the high nibble, an odd
// count padded with a zero nibble. The tables are inputs (initializers), not attributes, so
// edgetune.s2a's derivative_tables.json is the single source of borders and levels, and one
// gradient definition per forward op, Act4Grad(GO(0), O(1), I(2)), fits every layer. The forward
// takes `levels` only so that the gradient definition can reach it as I(2).
//
// In the training graph the backward then keeps 0.5 byte per element (the codes) where ORT's
// own Sigmoid/Mul decomposition keeps x and sigmoid(x) in fp32 (8 bytes).
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernel_io.h"

namespace {

using namespace et_ort;

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }
inline float gelu_tanh(float x) {
  const float k = 0.79788456080286536f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

inline uint8_t code_of(float x, const float* borders, int64_t nb) {
  uint8_t c = 0;
  for (int64_t k = 0; k < nb; ++k) c += !(x <= borders[k]);  // == x > b; NaN counts every border, as bucketize
  return c;
}

template <float (*F)(float)>
void act4_forward(OrtKernelContext* ctx) {
  Tensor x, borders, levels;
  bool ok = read_input(ctx, 0, &x) && read_input(ctx, 1, &borders) && read_input(ctx, 2, &levels);
  const int64_t n = x.numel();
  const int64_t nb = ok && borders.dims.size() == 1 ? borders.dims[0] : -1;
  ok = ok && nb >= 0 && nb <= 15 && levels.dims.size() == 1 && levels.dims[0] == nb + 1;
  auto* y = static_cast<float*>(make_output(ctx, 0, x.dims));
  auto* codes = static_cast<uint8_t*>(make_output(ctx, 1, {(n + 1) / 2}));
  if (!y || !codes) return;
  if (!ok) {
    fill_nan(y, n);
    std::fill(codes, codes + (n + 1) / 2, 0);
    return;
  }
  const auto* xs = static_cast<const float*>(x.data);
  const auto* b = static_cast<const float*>(borders.data);
  for (int64_t i = 0; i < n; ++i) y[i] = F(xs[i]);
  int64_t i = 0;
  for (; i + 1 < n; i += 2) codes[i / 2] = code_of(xs[i], b, nb) | (code_of(xs[i + 1], b, nb) << 4);
  if (i < n) codes[i / 2] = code_of(xs[i], b, nb);
}

void act4_grad(OrtKernelContext* ctx) {
  Tensor dy, codes, levels;
  bool ok = read_input(ctx, 0, &dy) && read_input(ctx, 1, &codes) && read_input(ctx, 2, &levels);
  const int64_t n = dy.numel();
  ok = ok && codes.dims.size() == 1 && codes.dims[0] == (n + 1) / 2 && levels.dims.size() == 1 &&
       levels.dims[0] >= 1 && levels.dims[0] <= 16;
  auto* dx = static_cast<float*>(make_output(ctx, 0, dy.dims));
  if (!dx) return;
  if (!ok) { fill_nan(dx, n); return; }
  const auto* g = static_cast<const float*>(dy.data);
  const auto* c = static_cast<const uint8_t*>(codes.data);
  float lv[16] = {0};  // a code past the table (a corrupted input) reads 0, never out of bounds
  std::copy(static_cast<const float*>(levels.data), static_cast<const float*>(levels.data) + levels.dims[0], lv);
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    const uint8_t byte = c[i / 2];
    dx[i] = lv[byte & 15] * g[i];
    dx[i + 1] = lv[byte >> 4] * g[i + 1];
  }
  if (i < n) dx[i] = lv[c[i / 2] & 15] * g[i];
}

Registered g_silu{"Act4SiLU", {ET_FLOAT, ET_FLOAT, ET_FLOAT}, {ET_FLOAT, ET_UINT8}, act4_forward<silu>};
Registered g_gelu{"Act4GELU", {ET_FLOAT, ET_FLOAT, ET_FLOAT}, {ET_FLOAT, ET_UINT8}, act4_forward<gelu>};
Registered g_gelu_tanh{"Act4GELUTanh", {ET_FLOAT, ET_FLOAT, ET_FLOAT}, {ET_FLOAT, ET_UINT8},
                       act4_forward<gelu_tanh>};
Registered g_grad{"Act4Grad", {ET_FLOAT, ET_UINT8, ET_FLOAT}, {ET_FLOAT}, act4_grad};

}  // namespace
