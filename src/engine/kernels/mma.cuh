// The tensor-core and copy instructions our `mma.sync` kernels share (`attention_mma.cu`,
// `conv3x3.cu`), each as on the GPU or, under `STUDIO_CUDA_EMULATION`, as the CPU emulation
// does it (`emulation/mma_sync.h`, `emulation/cuda_emulation.h`):
//   - `mma_16816`: D += A·B for one warp-wide 16×8×16 step in f16 with f32 accumulators
//     (Turing, which lacks m16n8k16, does it as two m16n8k8);
//   - `ldmatrix_x4`: four 8×8 matrices of 16-bit values from shared memory into fragments,
//     as stored or transposed;
//   - `copy_16`, `commit_copies`, `wait_copies`: 16-byte copies from global to shared memory,
//     asynchronous (`cp.async`) on Ampere and newer.
// Fragment layouts, for lane = 4·g + t (g = lane / 4, t = lane % 4), pairs packed low
// element first:
//   A (16×16, row-major): a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, same cols),
//                          a2 = (row g, cols 2t+8, 2t+9), a3 = (row g+8, cols 2t+8, 2t+9)
//   B (16×8, "col"):       b0 = (rows 2t, 2t+1 of column g), b1 = (rows 2t+8, 2t+9)
//   C (16×8, f32):         c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols)
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

// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`: lane 8·m + r gives the address of
// row r of 8×8 matrix m (16 bytes in shared memory, 16-byte aligned); register m receives
// matrix m's pair for this lane, as stored or transposed (see mma_sync.h's emulation).
template <bool TRANSPOSED>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __half* row) {
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
__device__ __forceinline__ void copy_16(__half* destination, const __half* source, bool inside) {
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
