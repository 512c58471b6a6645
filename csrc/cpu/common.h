// Shared helpers of edgetune's CPU ops (csrc/cpu/*.cpp). Every op is registered in the
// `edgetune_cpu` torch.library namespace; the public schemas live in edgetune/kernels/ops.py,
// which routes each call to a backend. Layouts are those of the pure-torch references
// (quant/actpack.py, quant/nf4.py, quant/bitpack.py) and are checked bit-exactly by tests/kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>

namespace edgetune_cpu {

constexpr int64_t kGrain = 4096;  // elements per parallel_for chunk

#define ET_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")
#define ET_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// code = #{borders : !(border >= v)}: torch.bucketize(v, borders, right=False) for ascending borders (NaN -> nb).
template <int NB>
static inline uint8_t bucket_fixed(float v, const float* b) {
  int c = 0;
  for (int i = 0; i < NB; ++i) c += (b[i] >= v) ? 0 : 1;
  return static_cast<uint8_t>(c);
}
static inline uint8_t bucket(float v, const float* b, int nb) {
  int c = 0;
  for (int i = 0; i < nb; ++i) c += (b[i] >= v) ? 0 : 1;
  return static_cast<uint8_t>(c);
}

}  // namespace edgetune_cpu
