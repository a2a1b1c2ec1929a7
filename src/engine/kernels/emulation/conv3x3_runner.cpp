// Runs `conv3x3.cu` on the CPU emulation (cuda_emulation.h, mma_sync.h), for the kernels'
// tests:
//
//   conv3x3_runner BATCH C_IN C_OUT HEIGHT WIDTH SHIFT TILE_COLUMNS NORMALIZED SILU SPLITS THREADS
//
// THREADS is the host's threads per block, which must be the kernel's. Reads, as
// little-endian f16 from stdin: the input (BATCH × C_IN × HEIGHT × WIDTH), the weights as the
// host stores them (C_OUT × C_IN / 16 × 9 × 16), the bias (C_OUT) and, if NORMALIZED is 1,
// the affines (BATCH · C_IN × 3: mean, scale, shift; values f16 holds exactly, widened to
// f32). Launches `conv3x3_f16` or `conv3x3_normalized_f16` on the grid the host would, K in
// SPLITS parts (then `conv3x3_sum_splits_f16` over their partial sums), and writes the output (BATCH × C_OUT × (HEIGHT << SHIFT) × (WIDTH << SHIFT)) to stdout the
// same way. Output nobody wrote stays NaN.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda_emulation.h"
#include "cuda_fp16.h"
#include "mma_sync.h"
#include "../conv3x3.cu"

int main(int argc, char** argv) {
  static_assert(sizeof(__half) == 2);
  if (argc != 12) {
    std::fprintf(stderr,
                 "usage: conv3x3_runner BATCH C_IN C_OUT HEIGHT WIDTH SHIFT TILE_COLUMNS "
                 "NORMALIZED SILU SPLITS THREADS\n");
    return 2;
  }
  const auto arg = [&](int i) { return static_cast<uint32_t>(std::stoul(argv[i])); };
  const uint32_t batch = arg(1), in_channels = arg(2), out_channels = arg(3);
  const uint32_t height = arg(4), width = arg(5), shift = arg(6), tile_columns = arg(7);
  const bool normalized = arg(8) != 0;
  const uint32_t silu = arg(9);
  const uint32_t splits = arg(10);
  if (arg(11) != THREADS) {
    std::fprintf(stderr, "conv3x3_runner: the host launches %u threads a block, the kernel %u\n",
                 arg(11), THREADS);
    return 2;
  }

  const std::vector<__half> input =
      emulation::read_stdin<__half>(static_cast<size_t>(batch) * in_channels * height * width);
  const std::vector<__half> weights = emulation::read_stdin<__half>(static_cast<size_t>(out_channels) * in_channels * 9);
  const std::vector<__half> bias = emulation::read_stdin<__half>(out_channels);
  std::vector<float> affines;
  if (normalized) {
    for (const __half value : emulation::read_stdin<__half>(static_cast<size_t>(batch) * in_channels * 3)) {
      affines.push_back(__half2float(value));
    }
  }
  const uint32_t out_height = height << shift;
  const uint32_t out_width = width << shift;
  std::vector<__half> out(static_cast<size_t>(batch) * out_channels * out_height * out_width,
                          __float2half(NAN));

  const uint32_t tile_rows = TILE_N / tile_columns;
  const uint32_t tiles = ((out_height + tile_rows - 1) / tile_rows) *
                         ((out_width + tile_columns - 1) / tile_columns);
  const dim3 grid{tiles, (out_channels + TILE_M - 1) / TILE_M, batch * splits};
  const auto kernel = normalized ? conv3x3_normalized_f16 : conv3x3_f16;
  // Split, the partial sums start NaN too: a cell no split wrote shows.
  std::vector<float> partials(splits > 1 ? splits * out.size() : 0, NAN);
  emulation::launch(grid, dim3{THREADS, 1, 1}, 0, [&] {
    kernel(input.data(), normalized ? affines.data() : nullptr, weights.data(), bias.data(),
           out.data(), splits > 1 ? partials.data() : nullptr, in_channels, out_channels,
           height, width, shift, tile_columns, silu, splits);
  });
  if (splits > 1) {
    const uint32_t planes = batch * out_channels;
    const uint32_t plane_len = out_height * out_width;
    emulation::launch(dim3{3, 1, 1}, dim3{64, 1, 1}, 0, [&] {
      conv3x3_sum_splits_f16(partials.data(), bias.data(), out.data(), splits, planes,
                             out_channels, plane_len);
    });
  }
  std::fwrite(out.data(), sizeof(__half), out.size(), stdout);
  return 0;
}
