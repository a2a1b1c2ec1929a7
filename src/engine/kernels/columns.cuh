// Writing the columns of a 3×3 convolution (stride 1, padded by one cell), laid out so that
// one GEMM with the weights, (c_out × 9·c_in) · (9·c_in × cells), gives the output already in
// the image layout (batch, c_out, h, w):
//
//   columns[image][channel·9 + ky·3 + kx][y·width + x]
//       = load(input pixel (top + y + ky − 1, x + kx − 1))   (zero outside the image)
//
// for the output rows top … top + rows − 1 (a band, or the whole image). With `shift` 1 the
// input is read as its ×2 nearest-neighbour upsampling (pixel (y, x) is input (y/2, x/2)), so
// an upsampler's convolution never holds the upsampled image; `height` and `width` are the
// input's, the rows and cells the output's. The zeros beyond the edges are the padding of
// what the convolution sees, so they are written as they are, never passed to `load`.
//
// A thread owns one cell of one channel plane: its nine reads are neighbours of its warp's
// (cached), and each of its nine writes is contiguous across the warp. Grid: x over the
// band's cells (blockDim.x a block), y over the planes (image · channels + channel).
// `im2col.cu` loads the input as it is; `group_norm.cu` normalises each value as it loads it.
#pragma once

#include <stdint.h>

#include "conversions.cuh"

namespace {

// `load(at)` gives the value the convolution sees at offset `at` of this plane's input.
template <typename T, typename Load>
__device__ __forceinline__ void write_columns_3x3(Load load, T* __restrict__ columns,
                                                  uint32_t height, uint32_t width,
                                                  uint32_t shift, uint32_t top, uint32_t rows) {
  const uint32_t out_height = height << shift;
  const uint32_t out_width = width << shift;
  const uint32_t cells = rows * out_width;
  const uint32_t cell = blockIdx.x * blockDim.x + threadIdx.x;
  if (cell >= cells) {
    return;
  }
  const uint32_t plane = blockIdx.y;
  const uint32_t y = cell / out_width;
  const uint32_t x = cell % out_width;
  T* out = columns + static_cast<size_t>(plane) * 9 * cells + cell;
  const T zero = from_float<T>(0.0f);
  for (int ky = 0; ky < 3; ++ky) {
    // The source row, one above the output row for ky = 0 (signed: it may be −1).
    const int source_row = static_cast<int>(top + y) + ky - 1;
    const bool row_inside = source_row >= 0 && source_row < static_cast<int>(out_height);
    for (int kx = 0; kx < 3; ++kx) {
      const int source_column = static_cast<int>(x) + kx - 1;
      const bool inside =
          row_inside && source_column >= 0 && source_column < static_cast<int>(out_width);
      T value = zero;
      if (inside) {
        // Inside, both are non-negative: the shift is the upsampling's halving.
        value = load(static_cast<size_t>(static_cast<uint32_t>(source_row) >> shift) * width +
                     (static_cast<uint32_t>(source_column) >> shift));
      }
      out[static_cast<size_t>(ky * 3 + kx) * cells] = value;
    }
  }
}

}  // namespace
