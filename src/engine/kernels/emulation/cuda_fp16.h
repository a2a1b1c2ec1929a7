// `__half` for the CUDA emulation (see cuda_emulation.h): IEEE binary16, rounded to nearest
// even, through the compiler's _Float16.
#pragma once

#include "cuda_emulation.h"

struct __half {
  _Float16 value;
};

inline __half __float2half(float x) { return __half{static_cast<_Float16>(x)}; }
inline __half __float2half_rn(float x) { return __float2half(x); }
inline float __half2float(__half x) { return static_cast<float>(x.value); }
