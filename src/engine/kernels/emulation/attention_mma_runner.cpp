// Runs `attention_mma.cu` on the CPU emulation (cuda_emulation.h, mma_sync.h), for the
// kernels' tests:
//
//   attention_mma_runner BATCH HEADS QUERIES KEYS HEAD_DIM KSTEPS ROWS THREADS SCALE_LOG2
//
// ROWS and THREADS are the host's query rows and threads per block, which must be the
// kernel's. It reads Q (BATCH × QUERIES × HEADS·HEAD_DIM), then K and V (BATCH × KEYS × HEADS·HEAD_DIM),
// as little-endian f16 from stdin, launches `attention_mma_f16_k<KSTEPS>` on the grid the
// host code would, and writes the output (Q's shape) to stdout the same way. Output nobody
// wrote stays NaN.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda_emulation.h"
#include "cuda_fp16.h"
#include "mma_sync.h"
#include "../attention_mma.cu"

int main(int argc, char** argv) {
  static_assert(sizeof(__half) == 2);
  if (argc != 10) {
    std::fprintf(stderr,
                 "usage: attention_mma_runner BATCH HEADS QUERIES KEYS HEAD_DIM KSTEPS ROWS "
                 "THREADS SCALE_LOG2\n");
    return 2;
  }
  const auto arg = [&](int i) { return static_cast<uint32_t>(std::stoul(argv[i])); };
  const uint32_t batch = arg(1), heads = arg(2), queries = arg(3), keys = arg(4);
  const uint32_t head_dim = arg(5), ksteps = arg(6);
  const float scale_log2 = std::stof(argv[9]);
  const uint32_t rows = 16 * WARPS;
  if (arg(7) != rows || arg(8) != THREADS) {
    std::fprintf(stderr,
                 "attention_mma_runner: the host launches %u rows and %u threads a block, the "
                 "kernel takes %u and %u\n",
                 arg(7), arg(8), rows, THREADS);
    return 2;
  }

  const size_t width = static_cast<size_t>(heads) * head_dim;
  const std::vector<__half> q = emulation::read_stdin<__half>(batch * queries * width);
  const std::vector<__half> k = emulation::read_stdin<__half>(batch * keys * width);
  const std::vector<__half> v = emulation::read_stdin<__half>(batch * keys * width);
  std::vector<__half> out(q.size(), __float2half(NAN));

  const dim3 grid{(queries + rows - 1) / rows, batch * heads, 1};
  const auto run = [&](auto kernel) {
    emulation::launch(grid, dim3{THREADS, 1, 1}, 0, [&] {
      kernel(q.data(), k.data(), v.data(), out.data(), heads, queries, keys, head_dim,
             scale_log2);
    });
  };
  switch (ksteps) {
    case 2: run(attention_mma_f16_k2); break;
    case 3: run(attention_mma_f16_k3); break;
    case 4: run(attention_mma_f16_k4); break;
    case 5: run(attention_mma_f16_k5); break;
    case 6: run(attention_mma_f16_k6); break;
    case 8: run(attention_mma_f16_k8); break;
    default:
      std::fprintf(stderr, "attention_mma_runner: no kernel for KSTEPS %u\n", ksteps);
      return 2;
  }
  std::fwrite(out.data(), sizeof(__half), out.size(), stdout);
  return 0;
}
