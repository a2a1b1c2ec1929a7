// The tensor-core and copy instructions our `mma.sync` kernels share (`attention_mma.cu`,
// `conv3x3.cu`), each as on the GPU or, under `STUDIO_CUDA_EMULATION`, as the CPU emulation
// does it (`emulation/mma_sync.h`, `emulation/cuda_emulation.h`):
//   - `mma_16816`: D += A·B for one warp-wide 16×8×16 step in f16 with f32 accumulators
//     (Turing, which lacks m16n8k16, does it as two m16n8k8);
//   - `mma_1688_tf32`: D += A·B for one 16×8×8 step in TF32 (f32 values, 10 bits of
//     mantissa in the products), f32 accumulators, Ampere and newer; `to_tf32` rounds a
//     value for it;
//   - `ldmatrix_x4`: four 8×8 matrices of 16-bit values from shared memory into fragments,
//     as stored or transposed (of 32-bit values, 8 rows of 4 as stored: a TF32 fragment);
//   - `copy_16`, `commit_copies`, `wait_copies`: 16-byte copies from global to shared memory,
//     asynchronous (`cp.async`) on Ampere and newer.
// Fragment layouts, for lane = 4·g + t (g = lane / 4, t = lane % 4), pairs packed low
// element first:
//   A (16×16, row-major): a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, same cols),
//                          a2 = (row g, cols 2t+8, 2t+9), a3 = (row g+8, cols 2t+8, 2t+9)
//   B (16×8, "col"):       b0 = (rows 2t, 2t+1 of column g), b1 = (rows 2t+8, 2t+9)
//   C (16×8, f32):         c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols)
// and in TF32, one 32-bit value a register:
//   A (16×8, row-major):   a0 = (row g, col t), a1 = (row g+8, col t), a2 = (row g, col t+4),
//                          a3 = (row g+8, col t+4)
//   B (8×8, "col"):        b0 = (row t, column g), b1 = (row t+4, column g)
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// D += A·B for one 16×8×16 step of a warp.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(STUDIO_CUDA_EMULATION)
  emulation::mma_m16n8k16(d, a, b0, b1);
#elif __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b0));
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
}

// D += A·B for one 16×8×8 step of a warp in TF32 (sm_80 and newer; never launched on older
// cards, where it traps). The hardware reads each operand's sign, exponent and top 10 bits of
// mantissa.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4],
                                              uint32_t b0, uint32_t b1) {
#if defined(STUDIO_CUDA_EMULATION)
  emulation::mma_m16n8k8_tf32(d, a, b0, b1);
#elif __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// `x` rounded to TF32 (to nearest, ties away: `cvt.rna.tf32.f32`), as an f32 whose low 13
// bits of mantissa are zero.
__device__ __forceinline__ float to_tf32(float x) {
#if defined(STUDIO_CUDA_EMULATION)
  return emulation::round_to_tf32(x);
#elif __CUDA_ARCH__ >= 800
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return __uint_as_float(bits);
#else
  return x;
#endif
}

// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`: lane 8·m + r gives the address of
// row r of 8×8 matrix m (16 bytes in shared memory, 16-byte aligned); register m receives
// matrix m's pair for this lane, as stored or transposed (see mma_sync.h's emulation). Of
// 32-bit values (rows of 4), as stored, register m receives (row g, value t).
template <bool TRANSPOSED>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(STUDIO_CUDA_EMULATION)
  emulation::ldmatrix_x4(r, row, TRANSPOSED);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (TRANSPOSED) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

// 16 bytes from global `source` to shared `destination` (both 16-byte aligned), or zeros
// where `inside` is false (`source` is then not read): `cp.async` on sm_80 and newer, whose
// data this thread may read once `wait_copies` has waited for its group; a plain copy on
// Turing, where the waits are nothing.
__device__ __forceinline__ void copy_16(void* destination, const void* source, bool inside) {
#if defined(STUDIO_CUDA_EMULATION)
  emulation::cp_async_16(destination, source, inside);
#elif __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(destination));
  const uint32_t bytes = inside ? 16 : 0;  // fewer bytes than 16: the rest are zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :
               : "r"(address), "l"(source), "r"(bytes));
#else
  *reinterpret_cast<uint4*>(destination) =
      inside ? *reinterpret_cast<const uint4*>(source) : make_uint4(0, 0, 0, 0);
#endif
}

// Closes this thread's group of copies since the last one.
__device__ __forceinline__ void commit_copies() {
#if defined(STUDIO_CUDA_EMULATION)
  emulation::cp_async_commit();
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `PENDING` of this thread's newest groups of copies are still in flight.
template <int PENDING>
__device__ __forceinline__ void wait_copies() {
#if defined(STUDIO_CUDA_EMULATION)
  emulation::cp_async_wait(PENDING);
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

}  // namespace
