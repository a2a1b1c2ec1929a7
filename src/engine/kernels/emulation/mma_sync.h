// `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32` for the CUDA emulation (see
// cuda_emulation.h): a warp-wide step, as on the GPU where the warp performs it together. Each
// lane posts its fragments (4 registers of A, 2 of B, pairs of f16 packed low element first),
// the warp meets, and each lane computes its own 4 accumulators from everyone's fragments,
// with the register layout the PTX ISA documents ("Matrix Fragments for mma.m16n8k16"), for
// lane = 4·g + t:
//   A (16×16): a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, cols 2t, 2t+1),
//              a2 = (row g, cols 2t+8, 2t+9), a3 = (row g+8, cols 2t+8, 2t+9)
//   B (16×8):  b0 = (rows 2t, 2t+1, column g), b1 = (rows 2t+8, 2t+9, column g)
//   C (16×8):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// The products are summed in f32 (the hardware's order of summation is its own).
//
// Also `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32` (`mma_m16n8k8_tf32`) and
// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`, which loads fragments from rows in
// shared memory (see `ldmatrix_x4`).
#pragma once

#include <cstdio>
#include <cstdlib>

#include "cuda_emulation.h"
#include "cuda_fp16.h"

namespace emulation {

// Element `index` (0: low, 1: high) of a packed pair, as f32.
inline float unpack(uint32_t pair, uint32_t index) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(pair >> (16 * index))));
}

// One warp-wide D += A·B of 16 × 8 × `depth`: this lane posts its fragments (4 registers of
// A, then 2 of B), the warp meets, and the lane computes its own 4 accumulators (C's layout)
// from everyone's, `a_at(posted, row, k)` and `b_at(posted, k, column)` reading A's and B's
// values from the warp's posted fragments (lane 0's first).
template <typename AAt, typename BAt>
inline void warp_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                     uint32_t depth, AAt a_at, BAt b_at) {
  const uint32_t lane = threadIdx.x % 32;
  block->fragments[threadIdx.x] = {a[0], a[1], a[2], a[3], b0, b1};
  block->warps[threadIdx.x / 32]->arrive_and_wait();
  const auto* posted = &block->fragments[threadIdx.x - lane];
  const uint32_t g = lane / 4;
  const uint32_t t = lane % 4;
  for (uint32_t i = 0; i < 4; ++i) {
    const uint32_t row = g + (i >= 2 ? 8 : 0);
    const uint32_t column = 2 * t + i % 2;
    float sum = 0.0f;
    for (uint32_t k = 0; k < depth; ++k) {
      sum += a_at(posted, row, k) * b_at(posted, k, column);
    }
    d[i] += sum;
  }
  block->warps[threadIdx.x / 32]->arrive_and_wait();
}

inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  // A(row, k): lane 4·(row % 8) + (k % 8) / 2, register (row ≥ 8) + 2·(k ≥ 8), element k % 2.
  const auto a_at = [](const auto* posted, uint32_t row, uint32_t k) {
    return unpack(posted[4 * (row % 8) + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)],
                  k % 2);
  };
  // B(k, column): lane 4·column + (k % 8) / 2, register 4 + (k ≥ 8), element k % 2.
  const auto b_at = [](const auto* posted, uint32_t k, uint32_t column) {
    return unpack(posted[4 * column + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)], k % 2);
  };
  warp_mma(d, a, b0, b1, 16, a_at, b_at);
}

// The value of TF32 bits as the tensor cores read them: sign, exponent and the top 10 bits of
// mantissa (the low 13 ignored).
inline float tf32_value(uint32_t bits) {
  bits &= 0xFFFFE000u;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// `cvt.rna.tf32.f32`: `x` rounded to 10 bits of mantissa, to nearest, ties away from zero
// (finite values; the kernels round nothing else).
inline float round_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`, the same way, one 32-bit value a
// register ("Matrix Fragments for mma.m16n8k8", .tf32), for lane = 4·g + t:
//   A (16×8): a0 = (row g, col t), a1 = (row g+8, col t), a2 = (row g, col t+4),
//             a3 = (row g+8, col t+4)
//   B (8×8):  b0 = (row t, column g), b1 = (row t+4, column g)
//   C (16×8): as m16n8k16's.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  // A(row, k): lane 4·(row % 8) + k % 4, register (row ≥ 8) + 2·(k ≥ 4).
  const auto a_at = [](const auto* posted, uint32_t row, uint32_t k) {
    return tf32_value(posted[4 * (row % 8) + k % 4][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
  };
  // B(k, column): lane 4·column + k % 4, register 4 + (k ≥ 4).
  const auto b_at = [](const auto* posted, uint32_t k, uint32_t column) {
    return tf32_value(posted[4 * column + k % 4][4 + (k >= 4 ? 1 : 0)]);
  };
  warp_mma(d, a, b0, b1, 8, a_at, b_at);
}

// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`: four 8×8 matrices of 16-bit values,
// a warp-wide load as on the GPU. Lane 8·m + r posts the address of row r of matrix m (16
// contiguous bytes, 16-byte aligned, as the hardware requires). Register m of lane 4·g + t
// holds, of matrix m, (row g, columns 2t and 2t + 1) as it is, or transposed (`.trans`)
// (rows 2t and 2t + 1 of column g); low element first.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* address, bool transposed) {
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t base = threadIdx.x - lane;
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) {
    std::fprintf(stderr, "ldmatrix: lane %u's row address is not 16-byte aligned\n", lane);
    std::abort();
  }
  block->addresses[threadIdx.x] = address;
  block->warps[threadIdx.x / 32]->arrive_and_wait();
  const uint32_t g = lane / 4;
  const uint32_t t = lane % 4;
  for (uint32_t m = 0; m < 4; ++m) {
    const auto element = [&](uint32_t row, uint32_t column) {
      uint16_t value;
      std::memcpy(&value,
                  static_cast<const unsigned char*>(block->addresses[base + 8 * m + row]) +
                      2 * column,
                  sizeof(value));
      return static_cast<uint32_t>(value);
    };
    r[m] = transposed ? element(2 * t, g) | (element(2 * t + 1, g) << 16)
                      : element(g, 2 * t) | (element(g, 2 * t + 1) << 16);
  }
  block->warps[threadIdx.x / 32]->arrive_and_wait();
}

}  // namespace emulation
