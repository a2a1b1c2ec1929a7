// WMMA for the CUDA emulation (see cuda_emulation.h), 16×16×16 f16 → f32 only. Every lane of
// a warp holds a whole fragment (row-major, logically); loads and stores are warp-wide steps
// (a barrier before and after), as on the GPU where the warp performs them together.
#pragma once

#include <type_traits>

#include "cuda_emulation.h"
#include "cuda_fp16.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16x16x16 only");
  T x[16 * 16];
};

namespace detail {
inline void warp_step() { __syncwarp(); }
inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  static_assert(!std::is_same_v<Use, accumulator>);
  detail::warp_step();
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      f.x[r * 16 + c] = std::is_same_v<Layout, row_major> ? p[r * ld + c] : p[c * ld + r];
    }
  }
  detail::warp_step();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  detail::warp_step();
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      f.x[r * 16 + c] = layout == mem_row_major ? p[r * ld + c] : p[c * ld + r];
    }
  }
  detail::warp_step();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  detail::warp_step();
  if (threadIdx.x % 32 == 0) {
    for (int r = 0; r < 16; ++r) {
      for (int c = 0; c < 16; ++c) {
        (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r * 16 + c];
      }
    }
  }
  detail::warp_step();
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T value) {
  for (auto& x : f.x) {
    x = value;
  }
}

template <typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, __half, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, __half, LayoutB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float result[16 * 16];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) {
        sum += detail::to_float(a.x[r * 16 + k]) * detail::to_float(b.x[k * 16 + n]);
      }
      result[r * 16 + n] = sum;
    }
  }
  std::copy(result, result + 16 * 16, d.x);
}

}  // namespace nvcuda::wmma
