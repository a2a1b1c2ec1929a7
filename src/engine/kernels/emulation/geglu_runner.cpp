// Runs `geglu.cu` on the CPU emulation (cuda_emulation.h), for the kernels' tests:
//
//   geglu_runner DTYPE ROWS INNER BLOCKS
//
// DTYPE is f32 or f16. Reads the projection (ROWS × 2·INNER), then the bias (2·INNER),
// little-endian, from stdin;
// launches BLOCKS blocks as the host code would; writes the output (ROWS × INNER) to stdout
// the same way. Output nobody wrote stays NaN.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda_emulation.h"
#include "../geglu.cu"

namespace {

template <typename T>
void run(uint32_t rows, uint32_t inner, uint32_t blocks) {
  const size_t count = static_cast<size_t>(rows) * inner;
  const std::vector<T> projected = emulation::read_stdin<T>(2 * count);
  const std::vector<T> bias = emulation::read_stdin<T>(2 * static_cast<size_t>(inner));
  std::vector<T> out(count, from_float<T>(NAN));
  emulation::launch(dim3{blocks, 1, 1}, dim3{THREADS, 1, 1}, 0, [&] {
    if constexpr (std::is_same_v<T, float>) {
      geglu_f32(projected.data(), bias.data(), out.data(), rows, inner);
    } else {
      geglu_f16(projected.data(), bias.data(), out.data(), rows, inner);
    }
  });
  std::fwrite(out.data(), sizeof(T), out.size(), stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: geglu_runner DTYPE ROWS INNER BLOCKS\n");
    return 2;
  }
  const auto arg = [&](int i) { return static_cast<uint32_t>(std::stoul(argv[i])); };
  const std::string dtype = argv[1];
  if (dtype == "f32") {
    run<float>(arg(2), arg(3), arg(4));
  } else if (dtype == "f16") {
    run<__half>(arg(2), arg(3), arg(4));
  } else {
    std::fprintf(stderr, "geglu_runner: DTYPE is f32 or f16, not %s\n", dtype.c_str());
    return 2;
  }
  return 0;
}
