// Runs `conv3x3.cu` on the CPU emulation (cuda_emulation.h, mma_sync.h), for the kernels'
// tests:
//
//   conv3x3_runner BITS BATCH C_IN C_OUT HEIGHT WIDTH SHIFT TILE_COLUMNS NORMALIZED SILU
//                  SPLITS THREADS
//
// BITS is 16 (the f16 kernels) or 32 (the TF32 ones, on f32 values). THREADS is the host's
// threads per block, which must be the kernel's. Reads, as little-endian values of BITS from
// stdin: the input (BATCH × C_IN × HEIGHT × WIDTH), the weights as the host stores them
// (C_OUT × C_IN / step × 9 × step, the step 16 channels in f16 and 8 in f32), the bias (C_OUT)
// and, if NORMALIZED is 1, the affines (BATCH · C_IN × 3: mean, scale, shift; in f16, values
// it holds exactly, widened to f32). Launches `conv3x3_*` or `conv3x3_normalized_*` on the grid
// the host would, K in SPLITS parts (then `conv3x3_sum_splits_*` over their partial sums),
// and writes the output (BATCH × C_OUT × (HEIGHT << SHIFT) × (WIDTH << SHIFT)) to stdout the
// same way. Output nobody wrote stays NaN.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda_emulation.h"
#include "cuda_fp16.h"
#include "mma_sync.h"
#include "../conv3x3.cu"

namespace {

struct Arguments {
  uint32_t batch, in_channels, out_channels, height, width, shift, tile_columns;
  bool normalized;
  uint32_t silu, splits;
};

template <typename T>
int run(const Arguments& args) {
  const auto [batch, in_channels, out_channels, height, width, shift, tile_columns, normalized,
              silu, splits] = args;
  const std::vector<T> input =
      emulation::read_stdin<T>(static_cast<size_t>(batch) * in_channels * height * width);
  const std::vector<T> weights =
      emulation::read_stdin<T>(static_cast<size_t>(out_channels) * in_channels * 9);
  const std::vector<T> bias = emulation::read_stdin<T>(out_channels);
  std::vector<float> affines;
  if (normalized) {
    for (const T value : emulation::read_stdin<T>(static_cast<size_t>(batch) * in_channels * 3)) {
      affines.push_back(to_float(value));
    }
  }
  const uint32_t out_height = height << shift;
  const uint32_t out_width = width << shift;
  std::vector<T> out(static_cast<size_t>(batch) * out_channels * out_height * out_width,
                     from_float<T>(NAN));

  const uint32_t tile_rows = TILE_N / tile_columns;
  const uint32_t tiles = ((out_height + tile_rows - 1) / tile_rows) *
                         ((out_width + tile_columns - 1) / tile_columns);
  const dim3 grid{tiles, (out_channels + TILE_M - 1) / TILE_M, batch * splits};
  constexpr bool F16 = sizeof(T) == 2;
  using Kernel = void (*)(const T*, const float*, const T*, const T*, T*, float*, uint32_t,
                          uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t);
  Kernel kernel;
  if constexpr (F16) {
    kernel = normalized ? conv3x3_normalized_f16 : conv3x3_f16;
  } else {
    kernel = normalized ? conv3x3_normalized_tf32 : conv3x3_tf32;
  }
  // Split, the partial sums start NaN too: a cell no split wrote shows.
  std::vector<float> partials(splits > 1 ? splits * out.size() : 0, NAN);
  emulation::launch(grid, dim3{THREADS, 1, 1}, 0, [&] {
    kernel(input.data(), normalized ? affines.data() : nullptr, weights.data(), bias.data(),
           out.data(), splits > 1 ? partials.data() : nullptr, in_channels, out_channels, height,
           width, shift, tile_columns, silu, splits);
  });
  if (splits > 1) {
    const uint32_t planes = batch * out_channels;
    const uint32_t plane_len = out_height * out_width;
    emulation::launch(dim3{3, 1, 1}, dim3{64, 1, 1}, 0, [&] {
      if constexpr (F16) {
        conv3x3_sum_splits_f16(partials.data(), bias.data(), out.data(), splits, planes,
                               out_channels, plane_len);
      } else {
        conv3x3_sum_splits_f32(partials.data(), bias.data(), out.data(), splits, planes,
                               out_channels, plane_len);
      }
    });
  }
  std::fwrite(out.data(), sizeof(T), out.size(), stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  static_assert(sizeof(__half) == 2);
  if (argc != 13) {
    std::fprintf(stderr,
                 "usage: conv3x3_runner BITS BATCH C_IN C_OUT HEIGHT WIDTH SHIFT TILE_COLUMNS "
                 "NORMALIZED SILU SPLITS THREADS\n");
    return 2;
  }
  const auto arg = [&](int i) { return static_cast<uint32_t>(std::stoul(argv[i])); };
  if (arg(12) != THREADS) {
    std::fprintf(stderr, "conv3x3_runner: the host launches %u threads a block, the kernel %u\n",
                 arg(12), THREADS);
    return 2;
  }
  const Arguments args{arg(2), arg(3), arg(4), arg(5), arg(6), arg(7),
                       arg(8), arg(9) != 0, arg(10), arg(11)};
  switch (arg(1)) {
    case 16:
      return run<__half>(args);
    case 32:
      return run<float>(args);
    default:
      std::fprintf(stderr, "conv3x3_runner: BITS is 16 or 32, not %u\n", arg(1));
      return 2;
  }
}
