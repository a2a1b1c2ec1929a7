// A CUDA grid run on CPU threads, for testing our kernels' source on machines without a GPU
// (`kernels::emulation`). One CPU thread per CUDA thread of a block, one block at a time;
// barriers stand for __syncthreads and __syncwarp, a per-warp mailbox for the shuffles;
// `__shared__` variables are statics (one block runs at a time). Only what our
// kernels use is here. It checks the kernels' logic (indexing, masking, the order of the
// synchronisation points as written), not their speed or the GPU's memory model.
#pragma once

// Kernel sources test this to call the emulation of an instruction they write as inline PTX.
#define STUDIO_CUDA_EMULATION 1

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(bytes) __attribute__((aligned(bytes)))
#define __shared__ static  // blocks run one at a time
#define __launch_bounds__(...)

struct dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

using std::max;
using std::min;

namespace emulation {

// The synchronisation of the block being run.
struct Block {
  explicit Block(uint32_t threads)
      : block(threads), exchange(threads), fragments(threads), addresses(threads) {
    for (uint32_t warp = 0; warp < threads / 32; ++warp) {
      warps.push_back(std::make_unique<std::barrier<>>(32));
    }
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange;  // one mailbox per thread, for the shuffles
  std::vector<std::array<uint32_t, 6>> fragments;  // one per thread, for mma.sync (mma_sync.h)
  std::vector<const void*> addresses;  // one per thread, for ldmatrix (mma_sync.h)
};

inline Block* block = nullptr;

// The block's dynamic shared memory, exactly as large as the launch asks (so that an address
// sanitizer sees any access past it), filled with 0xff bytes (NaN as f16 and f32) before
// each block, so that reading what no thread wrote shows in the results.
inline std::vector<unsigned char> dynamic_shared;

#define DYNAMIC_SHARED_MEMORY(name) unsigned char* name = emulation::dynamic_shared.data()

// Runs `kernel` on every thread of every block of the grid, a block at a time: one CPU
// thread per CUDA thread of a block, each going through the blocks in turn, all of them
// meeting at a barrier between blocks (where the dynamic shared memory is filled again).
template <typename Kernel>
void launch(dim3 grid, dim3 threads, size_t shared_bytes, Kernel kernel) {
  gridDim = grid;
  blockDim = threads;
  Block state(threads.x);
  block = &state;
  dynamic_shared.assign(shared_bytes, 0xff);
  std::vector<std::thread> running;
  for (uint32_t t = 0; t < threads.x; ++t) {
    running.emplace_back([=, &state] {
      threadIdx = dim3{t, 0, 0};
      for (uint32_t z = 0; z < grid.z; ++z) {
        for (uint32_t y = 0; y < grid.y; ++y) {
          for (uint32_t x = 0; x < grid.x; ++x) {
            blockIdx = dim3{x, y, z};
            kernel();
            state.block.arrive_and_wait();
            if (t == 0) {
              dynamic_shared.assign(shared_bytes, 0xff);
            }
            state.block.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& thread : running) {
    thread.join();
  }
  block = nullptr;
}

// `cp.async` (16 bytes, global to shared): each copy waits in this thread's current group
// and happens only when `cp_async_wait` lets its group complete, so a kernel that reads
// shared memory before waiting for the copy that fills it reads what was there before.
struct PendingCopy {
  void* destination;
  const void* source;
  bool inside;  // else 16 zero bytes, the source not read
};
inline thread_local std::vector<PendingCopy> uncommitted_copies;
inline thread_local std::vector<std::vector<PendingCopy>> committed_copies;

inline void cp_async_16(void* destination, const void* source, bool inside) {
  const auto aligned = [](const void* address) {
    return reinterpret_cast<uintptr_t>(address) % 16 == 0;
  };
  if (!aligned(destination) || (inside && !aligned(source))) {
    std::fprintf(stderr, "cp.async: an address is not 16-byte aligned\n");
    std::abort();
  }
  uncommitted_copies.push_back({destination, source, inside});
}

inline void cp_async_commit() {
  committed_copies.push_back(std::move(uncommitted_copies));
  uncommitted_copies.clear();
}

// Completes this thread's oldest groups until at most `pending` remain.
inline void cp_async_wait(size_t pending) {
  while (committed_copies.size() > pending) {
    for (const PendingCopy& copy : committed_copies.front()) {
      if (copy.inside) {
        std::memcpy(copy.destination, copy.source, 16);
      } else {
        std::memset(copy.destination, 0, 16);
      }
    }
    committed_copies.erase(committed_copies.begin());
  }
}

template <typename T>
T shuffle(T value, uint32_t from_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const uint32_t warp_base = threadIdx.x / 32 * 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  block->exchange[threadIdx.x] = bits;
  block->warps[threadIdx.x / 32]->arrive_and_wait();
  bits = block->exchange[warp_base + from_lane];
  block->warps[threadIdx.x / 32]->arrive_and_wait();
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

}  // namespace emulation

inline void __syncthreads() { emulation::block->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emulation::block->warps[threadIdx.x / 32]->arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return emulation::shuffle(value, (threadIdx.x % 32) ^ static_cast<uint32_t>(lane_mask));
}

template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta) {
  const uint32_t lane = threadIdx.x % 32;
  const T shifted = emulation::shuffle(value, lane + delta < 32 ? lane + delta : lane);
  return shifted;
}

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float x, float y) { return x / y; }

namespace emulation {

// `count` values of T, little-endian, from the runner's stdin (what the test sends); a
// runner whose input ends early stops there, saying so.
template <typename T>
std::vector<T> read_stdin(size_t count) {
  std::vector<T> values(count);
  if (std::fread(values.data(), sizeof(T), count, stdin) != count) {
    std::fprintf(stderr, "the runner's stdin ended before %zu values\n", count);
    std::exit(2);
  }
  return values;
}

}  // namespace emulation
