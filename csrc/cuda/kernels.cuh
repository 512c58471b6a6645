// edgetune CUDA kernels: plain CUDA (no torch headers), so `nvcc -c kernels.cu` checks them
// anywhere nvcc exists. ops.cpp binds them to torch.ops.edgetune_cuda. Layouts as csrc/cpu.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace edgetune_cuda {

// dtype codes for the templated launchers
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

cudaError_t act4_forward(const void* x, void* y, uint8_t* packed, int64_t n, const float* borders, int nb, int op,
                         DType dt, cudaStream_t s);
cudaError_t act4_backward(const void* grad, const uint8_t* packed, const float* levels_in_grad_dtype, void* out,
                          int64_t n, DType dt, cudaStream_t s);
cudaError_t pack_nibbles(const uint8_t* codes, uint8_t* out, int64_t n, cudaStream_t s);
cudaError_t unpack_nibbles(const uint8_t* packed, uint8_t* out, int64_t n, cudaStream_t s);
cudaError_t pack_bits(const bool* mask, uint8_t* out, int64_t n, cudaStream_t s);
cudaError_t unpack_bits(const uint8_t* packed, bool* out, int64_t n, cudaStream_t s);
cudaError_t quantize_int8(const void* x, int64_t n, int group, const float* noise, uint8_t* codes, float* lo,
                          float* scale, DType dt, cudaStream_t s);
cudaError_t dequantize_int8(const uint8_t* codes, const float* lo, const float* scale, int64_t n, int group, void* out,
                            DType dt, cudaStream_t s);
// rows [r0, r1) of the NF4 weight (out, in) into dst ((r1 - r0), in)
cudaError_t nf4_dequant_rows(const uint8_t* packed, const float* absmax, int64_t r0, int64_t r1, int64_t in_f,
                             int64_t blocksize, void* dst, DType dt, cudaStream_t s);
cudaError_t sketch_gather(const void* table, const uint8_t* codes, int64_t out_f, int64_t in_f, int64_t gpr, int bits,
                          void* w, DType dt, cudaStream_t s);
// rows of grad_w (rows, in) starting at output row r0 scattered into out (out_f, gpr, K) float32
cudaError_t sketch_scatter_add(const void* grad_w, const uint8_t* codes, int64_t r0, int64_t rows, int64_t in_f,
                               int64_t gpr, int bits, float* out, DType dt, cudaStream_t s);

}  // namespace edgetune_cuda
