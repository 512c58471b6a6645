// edgetune's ONNX Runtime custom ops: a frozen NF4 (bitsandbytes layout) matmul and its
// input gradient, both computed from the packed 4-bit weight without ever holding the dense
// weight: each kernel decodes a tile of TILE_O weight rows at a time into a small buffer.
//
//   edgetune::NF4MatMul(x (..., K) f32, packed (N*K/2) u8, absmax (N*K/bs) f32) -> y (..., N) f32
//       y = x @ W^T, W[o, i] = NF4[code(o*K + i)] * absmax[(o*K + i) / bs]
//   edgetune::NF4MatMulGrad(dy (..., N) f32, packed, absmax) -> dx (..., K) f32
//       dx = dy @ W
//
// Sizes come from the inputs, not from attributes, so one gradient definition (registered in
// Python before the training artifacts are generated) fits every layer: N*K = 2 * len(packed),
// K (forward) or N (backward) is the last dim of the first input, and bs = N*K / len(absmax).
// The code order is bitsandbytes': element 2j in the high nibble of byte j, 2j+1 in the low one.
// A call whose shapes do not fit fills its output with NaN, which the training loop reports as a
// non-finite loss (a V1 kernel has no way to return an error status).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_io.h"

namespace {

using namespace et_ort;

constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

constexpr int64_t TILE_O = 16;   // weight rows decoded at once
constexpr int64_t TILE_M = 64;   // activation rows that share one decoded tile

// Decode weight rows [o0, o0 + rows) (each K values) into buf (rows * K floats).
void decode_rows(const uint8_t* packed, const float* absmax, int64_t K, int64_t bs, int64_t o0, int64_t rows,
                 float* buf) {
  const int64_t e0 = o0 * K, e1 = (o0 + rows) * K;  // element range; K*o0 is even because N*K is
  for (int64_t e = e0; e < e1;) {
    const int64_t block_end = std::min(e1, (e / bs + 1) * bs);
    const float s = absmax[e / bs];
    float* w = buf + (e - e0);
    const uint8_t* p = packed + (e >> 1);
    int64_t n = block_end - e;
    if (e & 1) {  // start on a low nibble (only when K is odd)
      *w++ = kNF4[*p++ & 15] * s;
      --n;
    }
    for (int64_t j = 0; j + 1 < n; j += 2, ++p) {
      w[j] = kNF4[*p >> 4] * s;
      w[j + 1] = kNF4[*p & 15] * s;
    }
    if (n & 1) w[n - 1] = kNF4[*p >> 4] * s;
    e = block_end;
  }
}

struct Shapes {
  int64_t M, K, N, bs;
};

// First input (..., last) with last = K (forward) or N (backward); fills in the rest.
bool shapes(const Tensor& a, const Tensor& packed, const Tensor& absmax, bool forward, Shapes* s) {
  if (a.dims.empty() || packed.dims.size() != 1 || absmax.dims.size() != 1) return false;
  const int64_t last = a.dims.back();
  const int64_t numel = 2 * packed.dims[0], nb = absmax.dims[0];
  if (last <= 0 || nb <= 0 || numel % last || numel % nb) return false;
  s->M = last ? a.numel() / last : 0;
  if (forward) { s->K = last; s->N = numel / last; } else { s->N = last; s->K = numel / last; }
  s->bs = numel / nb;
  return s->bs % 2 == 0;
}

// Decode weight rows [o0, o0 + rows) transposed: buf[i * TILE_O + t] = W[o0 + t, i] (rows <= TILE_O;
// columns t >= rows are zero).
void decode_rows_t(const uint8_t* packed, const float* absmax, int64_t K, int64_t bs, int64_t o0, int64_t rows,
                   float* row_buf, float* buf) {
  decode_rows(packed, absmax, K, bs, o0, rows, row_buf);
  std::fill(buf, buf + K * TILE_O, 0.f);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < K; ++i) buf[i * TILE_O + t] = row_buf[t * K + i];
}

// y (M, N) = x (M, K) @ W^T. The TILE_O = 16 outputs of a tile are accumulated side by side in
// two 8-float vectors per activation row (acc[t] += x[i] * W[t, i], i ascending), four rows at a
// time so each loaded weight vector feeds four multiply-adds. No sum is reassociated, so it
// vectorises without -ffast-math (a single dot-product accumulator does not).
typedef float v8sf __attribute__((vector_size(32)));
static_assert(TILE_O == 16, "the forward kernel holds a tile's outputs in two 8-float vectors");

template <int MR>
inline void forward_rows(const float* x, int64_t K, const float* buf, float acc_out[][TILE_O]) {
  v8sf acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = v8sf{};
  for (int64_t i = 0; i < K; ++i) {
    v8sf w0, w1;
    std::memcpy(&w0, buf + i * TILE_O, sizeof(w0));
    std::memcpy(&w1, buf + i * TILE_O + 8, sizeof(w1));
    for (int r = 0; r < MR; ++r) {
      const v8sf a = v8sf{} + x[r * K + i];
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    std::memcpy(acc_out[r], &acc[r][0], sizeof(v8sf));
    std::memcpy(acc_out[r] + 8, &acc[r][1], sizeof(v8sf));
  }
}

void nf4_forward(const float* x, const uint8_t* packed, const float* absmax, const Shapes& s, float* y) {
  std::vector<float> rows_buf(TILE_O * s.K), buf(TILE_O * s.K);
  float acc[4][TILE_O];
  for (int64_t o0 = 0; o0 < s.N; o0 += TILE_O) {
    const int64_t rows = std::min(TILE_O, s.N - o0);
    decode_rows_t(packed, absmax, s.K, s.bs, o0, rows, rows_buf.data(), buf.data());
    for (int64_t m = 0; m < s.M;) {
      const int64_t mr = s.M - m >= 4 ? 4 : 1;
      if (mr == 4) forward_rows<4>(x + m * s.K, s.K, buf.data(), acc);
      else forward_rows<1>(x + m * s.K, s.K, buf.data(), acc);
      for (int64_t r = 0; r < mr; ++r)
        for (int64_t t = 0; t < rows; ++t) y[(m + r) * s.N + o0 + t] = acc[r][t];
      m += mr;
    }
  }
}

// dx (M, K) = dy (M, N) @ W. For 8 columns of dx at a time the tile's rows are added in order
// (t ascending) in a vector register: the same sums in the same order as a scalar loop.
void nf4_backward(const float* dy, const uint8_t* packed, const float* absmax, const Shapes& s, float* dx) {
  std::fill(dx, dx + s.M * s.K, 0.f);
  std::vector<float> buf(TILE_O * s.K);
  const int64_t K8 = s.K - s.K % 8;
  for (int64_t m0 = 0; m0 < s.M; m0 += TILE_M) {
    const int64_t m1 = std::min(s.M, m0 + TILE_M);
    for (int64_t o0 = 0; o0 < s.N; o0 += TILE_O) {
      const int64_t rows = std::min(TILE_O, s.N - o0);
      decode_rows(packed, absmax, s.K, s.bs, o0, rows, buf.data());
      for (int64_t m = m0; m < m1; ++m) {
        float* dxm = dx + m * s.K;
        const float* dym = dy + m * s.N + o0;
        for (int64_t i = 0; i < K8; i += 8) {
          v8sf v, w;
          std::memcpy(&v, dxm + i, sizeof(v));
          for (int64_t t = 0; t < rows; ++t) {
            std::memcpy(&w, buf.data() + t * s.K + i, sizeof(w));
            v += (v8sf{} + dym[t]) * w;
          }
          std::memcpy(dxm + i, &v, sizeof(v));
        }
        for (int64_t i = K8; i < s.K; ++i) {
          float v = dxm[i];
          for (int64_t t = 0; t < rows; ++t) v += dym[t] * buf[t * s.K + i];
          dxm[i] = v;
        }
      }
    }
  }
}

template <bool Forward>
void compute(OrtKernelContext* ctx) {
  Tensor a, packed, absmax;
  Shapes s{};
  const bool ok = read_input(ctx, 0, &a) && read_input(ctx, 1, &packed) && read_input(ctx, 2, &absmax) &&
                  shapes(a, packed, absmax, Forward, &s);
  std::vector<int64_t> dims = a.dims;
  if (!dims.empty()) dims.back() = ok ? (Forward ? s.N : s.K) : dims.back();
  auto* out = static_cast<float*>(make_output(ctx, 0, dims));
  if (!out) return;
  if (!ok) { fill_nan(out, a.numel()); return; }
  const auto* p = static_cast<const uint8_t*>(packed.data);
  const auto* am = static_cast<const float*>(absmax.data);
  if (Forward) nf4_forward(static_cast<const float*>(a.data), p, am, s, out);
  else nf4_backward(static_cast<const float*>(a.data), p, am, s, out);
}

Registered g_forward{"NF4MatMul", {ET_FLOAT, ET_UINT8, ET_FLOAT}, {ET_FLOAT}, compute<true>};
Registered g_backward{"NF4MatMulGrad", {ET_FLOAT, ET_UINT8, ET_FLOAT}, {ET_FLOAT}, compute<false>};

}  // namespace
