// GEGLU, the UNet feed-forward's gate, in one pass, with the projection's bias: each row of
// the projection (its GEMM without the bias) holds two halves `[a | b]` of `inner` values, and
// the output row is (a + bias_a) · gelu(b + bias_b), with the exact (erf) GELU, computed in
// f32 and rounded once. candle runs it as a broadcast add of the bias over the whole
// projection, then gelu on a strided view of the second half, then a strided multiply with
// the first: three kernels, two temporaries, and strided reads.
#include <cuda_fp16.h>
#include <stdint.h>

#include "conversions.cuh"

namespace {

constexpr int THREADS = 256;

template <typename T>
__device__ void geglu(const T* __restrict__ projected, const T* __restrict__ bias,
                      T* __restrict__ out, uint32_t rows, uint32_t inner) {
  const size_t total = static_cast<size_t>(rows) * inner;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / inner;
    const size_t column = i % inner;
    const T* halves = projected + row * 2 * inner;
    const float a = to_float(halves[column]) + to_float(bias[column]);
    const float b = to_float(halves[inner + column]) + to_float(bias[inner + column]);
    const float gelu = 0.5f * b * (1.0f + erff(b * 0.70710678118654752f));
    out[i] = from_float<T>(a * gelu);
  }
}

}  // namespace

#define GEGLU(NAME, T)                                                                   \
  extern "C" __global__ void __launch_bounds__(THREADS)                                  \
      geglu_##NAME(const T* projected, const T* bias, T* out, uint32_t rows,             \
                   uint32_t inner) {                                                     \
    geglu<T>(projected, bias, out, rows, inner);                                         \
  }

GEGLU(f32, float)
GEGLU(f16, __half)
