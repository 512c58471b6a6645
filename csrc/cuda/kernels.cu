// edgetune CUDA kernels (see kernels.cuh). Targets sm_80 / sm_87 (Jetson Orin) / sm_89 / sm_90.
#include "kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace edgetune_cuda {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? (b > 0 ? b : 1) : 65535 * 32);
}

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float act(float x, int op) {
  if (op == 0) return x / (1.0f + expf(-x));
  if (op == 1) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
  return 0.5f * x * (1.0f + tanhf(0.79788456080286535588f * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ uint8_t bucket(float v, const float* b, int nb) {
  int c = 0;
  for (int i = 0; i < nb; ++i) c += (b[i] >= v) ? 0 : 1;  // a NaN counts every border, as torch.bucketize
  return static_cast<uint8_t>(c);
}

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

template <typename T>
__global__ void act4_forward_k(const T* x, T* y, uint8_t* packed, int64_t n, const float* borders, int nb, int op) {
  __shared__ float b[16];
  if (threadIdx.x < nb) b[threadIdx.x] = borders[threadIdx.x];
  __syncthreads();
  const int64_t pairs = (n + 1) / 2;
  GRID_STRIDE(i, pairs) {
    const int64_t e = 2 * i;
    const float v0 = to_f(x[e]);
    y[e] = from_f<T>(act(v0, op));
    uint8_t c1 = 0;
    if (e + 1 < n) {
      const float v1 = to_f(x[e + 1]);
      y[e + 1] = from_f<T>(act(v1, op));
      c1 = bucket(v1, b, nb);
    }
    packed[i] = static_cast<uint8_t>(bucket(v0, b, nb) | (c1 << 4));
  }
}

template <typename T>
__global__ void act4_backward_k(const T* g, const uint8_t* packed, const float* levels, T* out, int64_t n) {
  __shared__ float lv[16];
  if (threadIdx.x < 16) lv[threadIdx.x] = levels[threadIdx.x];
  __syncthreads();
  GRID_STRIDE(e, n) {
    const uint8_t byte = packed[e >> 1];
    const int c = (e & 1) ? (byte >> 4) : (byte & 0x0F);
    out[e] = from_f<T>(to_f(g[e]) * lv[c]);
  }
}

__global__ void pack_nibbles_k(const uint8_t* c, uint8_t* out, int64_t n) {
  GRID_STRIDE(i, (n + 1) / 2) {
    const uint8_t hi = (2 * i + 1 < n) ? c[2 * i + 1] : 0;
    out[i] = static_cast<uint8_t>(c[2 * i] | (hi << 4));
  }
}

__global__ void unpack_nibbles_k(const uint8_t* p, uint8_t* out, int64_t n) {
  GRID_STRIDE(e, n) out[e] = (e & 1) ? (p[e >> 1] >> 4) : (p[e >> 1] & 0x0F);
}

__global__ void pack_bits_k(const bool* m, uint8_t* out, int64_t n) {
  GRID_STRIDE(i, (n + 7) / 8) {
    uint8_t byte = 0;
    for (int j = 0; j < 8; ++j) {
      const int64_t e = 8 * i + j;
      if (e < n && m[e]) byte |= static_cast<uint8_t>(1u << j);
    }
    out[i] = byte;
  }
}

__global__ void unpack_bits_k(const uint8_t* p, bool* out, int64_t n) {
  GRID_STRIDE(e, n) out[e] = (p[e >> 3] >> (e & 7)) & 1;
}

// one warp per group: min/max by shuffles, then codes
template <typename T>
__global__ void quantize_int8_k(const T* x, int64_t n, int group, int64_t groups, const float* noise, uint8_t* codes,
                                float* lo, float* scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  for (int64_t g = warp; g < groups; g += nwarps) {
    const int64_t base = g * group;
    float mn = INFINITY, mx = -INFINITY;
    for (int j = lane; j < group; j += 32) {
      const float v = base + j < n ? to_f(x[base + j]) : 0.0f;
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    for (int o = 16; o > 0; o >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    const float s = __fdiv_rn(mx - mn, 255.0f);
    const float inv = s > 0.0f ? __frcp_rn(s) : 0.0f;
    if (lane == 0) {
      lo[g] = mn;
      scale[g] = s;
    }
    for (int j = lane; j < group; j += 32) {
      const float v = base + j < n ? to_f(x[base + j]) : 0.0f;
      const float t = __fmul_rn(__fsub_rn(v, mn), inv);
      float q = noise ? floorf(__fadd_rn(t, noise[base + j])) : rintf(t);
      q = fminf(fmaxf(q, 0.0f), 255.0f);
      codes[base + j] = static_cast<uint8_t>(q);
    }
  }
}

template <typename T>
__global__ void dequantize_int8_k(const uint8_t* codes, const float* lo, const float* scale, int64_t n, int group,
                                  T* out) {
  GRID_STRIDE(e, n) {
    const int64_t g = e / group;
    out[e] = from_f<T>(__fadd_rn(__fmul_rn(static_cast<float>(codes[e]), scale[g]), lo[g]));
  }
}

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

template <typename T>
__global__ void nf4_dequant_rows_k(const uint8_t* packed, const float* absmax, int64_t r0, int64_t count, int64_t in_f,
                                   int64_t blocksize, T* dst) {
  GRID_STRIDE(i, count) {
    const int64_t e = r0 * in_f + i;
    const uint8_t byte = packed[e >> 1];
    const int q = (e & 1) ? (byte & 0x0F) : (byte >> 4);
    dst[i] = from_f<T>(__fmul_rn(kNF4[q], absmax[e / blocksize]));
  }
}

__device__ __forceinline__ int code_at(const uint8_t* row, int64_t nbytes, int64_t c, int bits) {
  const int64_t p = c * bits;
  const int64_t byte = p >> 3;
  const int shift = static_cast<int>(p & 7);
  unsigned v = row[byte];
  if (shift + bits > 8 && byte + 1 < nbytes) v |= static_cast<unsigned>(row[byte + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1));
}

template <typename T>
__global__ void sketch_gather_k(const T* table, const uint8_t* codes, int64_t out_f, int64_t in_f, int64_t gpr,
                                int bits, T* w) {
  const int64_t nbytes = (in_f * bits + 7) / 8, K = 1 << bits;
  GRID_STRIDE(i, out_f * in_f) {
    const int64_t r = i / in_f, c = i % in_f;
    w[i] = table[r * gpr * K + (c * gpr / in_f) * K + code_at(codes + r * nbytes, nbytes, c, bits)];
  }
}

template <typename T>
__global__ void sketch_scatter_k(const T* gw, const uint8_t* codes, int64_t r0, int64_t rows, int64_t in_f,
                                 int64_t gpr, int bits, float* out) {
  const int64_t nbytes = (in_f * bits + 7) / 8, K = 1 << bits;
  GRID_STRIDE(i, rows * in_f) {
    const int64_t r = i / in_f + r0, c = i % in_f;
    atomicAdd(out + r * gpr * K + (c * gpr / in_f) * K + code_at(codes + r * nbytes, nbytes, c, bits), to_f(gw[i]));
  }
}

}  // namespace

#define ET_DTYPE_SWITCH(dt, T, ...)                 \
  switch (dt) {                                     \
    case kF32: { using T = float; __VA_ARGS__; break; }          \
    case kF16: { using T = __half; __VA_ARGS__; break; }         \
    case kBF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;          \
  }

cudaError_t act4_forward(const void* x, void* y, uint8_t* packed, int64_t n, const float* borders, int nb, int op,
                         DType dt, cudaStream_t s) {
  if (nb > 16) return cudaErrorInvalidValue;
  ET_DTYPE_SWITCH(dt, T, act4_forward_k<T><<<blocks_for((n + 1) / 2), kThreads, 0, s>>>(
      static_cast<const T*>(x), static_cast<T*>(y), packed, n, borders, nb, op));
  return cudaGetLastError();
}

cudaError_t act4_backward(const void* grad, const uint8_t* packed, const float* levels, void* out, int64_t n, DType dt,
                          cudaStream_t s) {
  ET_DTYPE_SWITCH(dt, T, act4_backward_k<T><<<blocks_for(n), kThreads, 0, s>>>(
      static_cast<const T*>(grad), packed, levels, static_cast<T*>(out), n));
  return cudaGetLastError();
}

cudaError_t pack_nibbles(const uint8_t* codes, uint8_t* out, int64_t n, cudaStream_t s) {
  pack_nibbles_k<<<blocks_for((n + 1) / 2), kThreads, 0, s>>>(codes, out, n);
  return cudaGetLastError();
}
cudaError_t unpack_nibbles(const uint8_t* packed, uint8_t* out, int64_t n, cudaStream_t s) {
  unpack_nibbles_k<<<blocks_for(n), kThreads, 0, s>>>(packed, out, n);
  return cudaGetLastError();
}
cudaError_t pack_bits(const bool* mask, uint8_t* out, int64_t n, cudaStream_t s) {
  pack_bits_k<<<blocks_for((n + 7) / 8), kThreads, 0, s>>>(mask, out, n);
  return cudaGetLastError();
}
cudaError_t unpack_bits(const uint8_t* packed, bool* out, int64_t n, cudaStream_t s) {
  unpack_bits_k<<<blocks_for(n), kThreads, 0, s>>>(packed, out, n);
  return cudaGetLastError();
}

cudaError_t quantize_int8(const void* x, int64_t n, int group, const float* noise, uint8_t* codes, float* lo,
                          float* scale, DType dt, cudaStream_t s) {
  const int64_t groups = (n + group - 1) / group;
  const int blocks = blocks_for(groups * 32);
  ET_DTYPE_SWITCH(dt, T, quantize_int8_k<T><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(x), n, group, groups,
                                                                          noise, codes, lo, scale));
  return cudaGetLastError();
}

cudaError_t dequantize_int8(const uint8_t* codes, const float* lo, const float* scale, int64_t n, int group, void* out,
                            DType dt, cudaStream_t s) {
  ET_DTYPE_SWITCH(dt, T, dequantize_int8_k<T><<<blocks_for(n), kThreads, 0, s>>>(codes, lo, scale, n, group,
                                                                                   static_cast<T*>(out)));
  return cudaGetLastError();
}

cudaError_t nf4_dequant_rows(const uint8_t* packed, const float* absmax, int64_t r0, int64_t r1, int64_t in_f,
                             int64_t blocksize, void* dst, DType dt, cudaStream_t s) {
  const int64_t count = (r1 - r0) * in_f;
  ET_DTYPE_SWITCH(dt, T, nf4_dequant_rows_k<T><<<blocks_for(count), kThreads, 0, s>>>(packed, absmax, r0, count, in_f,
                                                                                        blocksize, static_cast<T*>(dst)));
  return cudaGetLastError();
}

cudaError_t sketch_gather(const void* table, const uint8_t* codes, int64_t out_f, int64_t in_f, int64_t gpr, int bits,
                          void* w, DType dt, cudaStream_t s) {
  ET_DTYPE_SWITCH(dt, T, sketch_gather_k<T><<<blocks_for(out_f * in_f), kThreads, 0, s>>>(
      static_cast<const T*>(table), codes, out_f, in_f, gpr, bits, static_cast<T*>(w)));
  return cudaGetLastError();
}

cudaError_t sketch_scatter_add(const void* grad_w, const uint8_t* codes, int64_t r0, int64_t rows, int64_t in_f,
                               int64_t gpr, int bits, float* out, DType dt, cudaStream_t s) {
  ET_DTYPE_SWITCH(dt, T, sketch_scatter_k<T><<<blocks_for(rows * in_f), kThreads, 0, s>>>(
      static_cast<const T*>(grad_w), codes, r0, rows, in_f, gpr, bits, out));
  return cudaGetLastError();
}

}  // namespace edgetune_cuda
