// f32 ⇄ storage type, for kernels that compute in f32 whatever they read and write (f32 or
// f16, rounded to nearest even once). Included by each kernel source.
#pragma once

#include <cuda_fp16.h>

namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

}  // namespace
