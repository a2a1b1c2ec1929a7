// Runs `attention.cu` on the CPU emulation (cuda_emulation.h), for the kernels' tests:
//
//   attention_runner BATCH HEADS QUERIES KEYS HEAD_DIM WARPS KEY_TILE SHARED_BYTES VECTORS
//                    SCALE_LOG2
//
// reads Q (BATCH × QUERIES × HEADS·HEAD_DIM), then K and V (BATCH × KEYS × HEADS·HEAD_DIM),
// as little-endian f16 from stdin, launches the grid the host code would, and writes the
// output (Q's shape) to stdout the same way. Output nobody wrote stays NaN.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda_emulation.h"
#include "../attention.cu"

int main(int argc, char** argv) {
  static_assert(sizeof(__half) == 2);
  if (argc != 11) {
    std::fprintf(stderr,
                 "usage: attention_runner BATCH HEADS QUERIES KEYS HEAD_DIM WARPS KEY_TILE "
                 "SHARED_BYTES VECTORS SCALE_LOG2\n");
    return 2;
  }
  const auto arg = [&](int i) { return static_cast<uint32_t>(std::stoul(argv[i])); };
  const uint32_t batch = arg(1), heads = arg(2), queries = arg(3), keys = arg(4);
  const uint32_t head_dim = arg(5), warps = arg(6), key_tile = arg(7);
  const size_t shared_bytes = std::stoul(argv[8]);
  const uint32_t vectors = arg(9);
  const float scale_log2 = std::stof(argv[10]);

  const size_t width = static_cast<size_t>(heads) * head_dim;
  const std::vector<__half> q = emulation::read_stdin<__half>(batch * queries * width);
  const std::vector<__half> k = emulation::read_stdin<__half>(batch * keys * width);
  const std::vector<__half> v = emulation::read_stdin<__half>(batch * keys * width);
  std::vector<__half> out(q.size(), __float2half(NAN));

  const uint32_t rows = warps * 16;
  const dim3 grid{(queries + rows - 1) / rows, batch * heads, 1};
  emulation::launch(grid, dim3{warps * 32, 1, 1}, shared_bytes, [&] {
    attention_f16(q.data(), k.data(), v.data(), out.data(), heads, queries, keys, head_dim,
                  key_tile, scale_log2, vectors);
  });
  std::fwrite(out.data(), sizeof(__half), out.size(), stdout);
  return 0;
}
