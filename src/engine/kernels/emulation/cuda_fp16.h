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
inline unsigned short __half_as_ushort(__half x) {
  unsigned short bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}
inline __half __ushort_as_half(unsigned short bits) {
  __half x;
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}
