// The columns of a 3×3 convolution, its input read as it is (or doubled, for an upsampler's
// convolution): the layout and the thread mapping are `columns.cuh`'s. candle's im2col
// writes the transpose, (cells × 9·c_in), with 64-bit index arithmetic per value and reads
// that stride across channel planes; its GEMM's output then needs a transposed copy to the
// image layout.
#include <cuda_fp16.h>
#include <stdint.h>

#include "columns.cuh"

namespace {

constexpr int THREADS = 256;

template <typename T>
__device__ void im2col_3x3(const T* __restrict__ input, T* __restrict__ columns,
                           uint32_t height, uint32_t width, uint32_t shift, uint32_t top,
                           uint32_t rows) {
  const T* source = input + static_cast<size_t>(blockIdx.y) * height * width;
  write_columns_3x3<T>([source](size_t at) { return source[at]; }, columns, height, width,
                       shift, top, rows);
}

}  // namespace

#define IM2COL(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS)                                  \
      im2col_3x3_##NAME(const T* input, T* columns, uint32_t height, uint32_t width,     \
                        uint32_t shift, uint32_t top, uint32_t rows) {                   \
    im2col_3x3<T>(input, columns, height, width, shift, top, rows);                      \
  }

IM2COL(f32, float)
IM2COL(f16, __half)
