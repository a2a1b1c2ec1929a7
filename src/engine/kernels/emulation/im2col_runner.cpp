// Runs `im2col.cu` on the CPU emulation (cuda_emulation.h), for the kernels' tests:
//
//   im2col_runner DTYPE PLANES HEIGHT WIDTH SHIFT TOP ROWS BLOCKS
//
// DTYPE is f32 or f16. Reads the input (PLANES × HEIGHT × WIDTH), little-endian, from stdin;
// launches BLOCKS × PLANES blocks as the host code would; writes the columns
// (PLANES × 9 × ROWS·(WIDTH << SHIFT)) to stdout the same way. Columns nobody wrote stay NaN.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda_emulation.h"
#include "../im2col.cu"

namespace {

template <typename T>
void run(uint32_t planes, uint32_t height, uint32_t width, uint32_t shift, uint32_t top,
         uint32_t rows, uint32_t blocks) {
  const std::vector<T> input =
      emulation::read_stdin<T>(static_cast<size_t>(planes) * height * width);
  std::vector<T> columns(static_cast<size_t>(planes) * 9 * rows * (width << shift),
                         from_float<T>(NAN));
  emulation::launch(dim3{blocks, planes, 1}, dim3{THREADS, 1, 1}, 0, [&] {
    if constexpr (std::is_same_v<T, float>) {
      im2col_3x3_f32(input.data(), columns.data(), height, width, shift, top, rows);
    } else {
      im2col_3x3_f16(input.data(), columns.data(), height, width, shift, top, rows);
    }
  });
  std::fwrite(columns.data(), sizeof(T), columns.size(), stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr,
                 "usage: im2col_runner DTYPE PLANES HEIGHT WIDTH SHIFT TOP ROWS BLOCKS\n");
    return 2;
  }
  const auto arg = [&](int i) { return static_cast<uint32_t>(std::stoul(argv[i])); };
  const std::string dtype = argv[1];
  if (dtype == "f32") {
    run<float>(arg(2), arg(3), arg(4), arg(5), arg(6), arg(7), arg(8));
  } else if (dtype == "f16") {
    run<__half>(arg(2), arg(3), arg(4), arg(5), arg(6), arg(7), arg(8));
  } else {
    std::fprintf(stderr, "im2col_runner: DTYPE is f32 or f16, not %s\n", dtype.c_str());
    return 2;
  }
  return 0;
}
