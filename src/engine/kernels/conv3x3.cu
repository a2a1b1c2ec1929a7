// A 3×3 convolution (stride 1, padded by one cell) with its bias, in f16, straight from the
// image: an implicit GEMM on the tensor cores (`mma.sync`, `mma.cuh`), the way cuDNN's and
// CUTLASS's implicit-GEMM convolutions work. The column matrix that `im2col.cu` writes (nine
// times the image) is never made: its values are gathered from the image into shared memory
// a tile at a time, used there, and dropped. So a convolution holds no column buffer (no
// bands: 128 MB off SD's 512² decode), the GPU does not write nine copies of the image to
// memory and read them back, and the bias is added before the one rounding to f16 (the
// column path's GEMM rounds, then its bias add rounds again, in a pass of its own).
//
// The GEMM: out[m][cell] = Σ_k W[m][k] · B[k][cell] + bias[m], k over (input channel, tap).
// A block computes 64 output channels × 128 output cells of one image, as 4 warps of 32 × 64
// (2 × 8 tiles of 16 × 8 accumulators each, in registers). The cells are a rectangle of the
// output, `tile_columns` wide (16, or 8 where 16 would leave too much of the tile past the
// image's edge: the host picks) and 128 / `tile_columns` rows high, the shapes whose halo is
// smallest (180 pixels for 128 cells; a row of 128 would take 390). K is walked 16 input
// channels at a time:
//   - the weights of those channels for the block's 64 outputs, all nine taps, copied
//     16 bytes at a time (`cp.async` on Ampere and newer) into rows of [tap][16 channels];
//     the host stores the weights as (c_out, c_in / 16, 9, 16) so that each is 288
//     contiguous bytes;
//   - the tile's halo (its rows and columns and one more on every side) of those channels,
//     a row of 16 channels per pixel: zeros outside the image, and, for the convolution
//     after a group norm and SiLU (`conv3x3_normalized_f16`), each value normalised as it is
//     loaded with its plane's (mean, scale, shift), so the normalised image is never made
//     either. An upsampler's convolution reads its input doubled (`shift` 1): output pixel
//     (y, x) is input (y / 2, x / 2).
// Then nine steps of 16, one per tap: the A fragments are rows of the weights (`ldmatrix`),
// the B fragments rows of the halo at the tap's offset (`ldmatrix`: 8 cells' 8 channels per
// matrix, as stored, which is the B operand's column-major order). Shared rows are 32 bytes,
// their halves swizzled (`half_at`), so each `ldmatrix` phase's 8 rows fall on all 32 banks.
//
// A grid of few blocks leaves most of a large GPU idle: the UNet's deepest levels (1280
// channels at 16² and 8²) make 20–80 tiles, against about 400 blocks a card like the H200 runs
// at once, each walking K (up to 2560 channels × 9) alone. So K may be split (`splits` > 1,
// the host's choice): block z = split · images + image walks its share of the chunks and
// writes f32 partial sums without the bias, which `conv3x3_sum_splits_f16` adds up in a fixed
// order (the same result every run, as a CUDA graph's checks need), with the bias, rounding
// once. cuBLAS splits the column path's GEMM the same way for such shapes.
//
// The same kernel runs f32 convolutions (an upcast VAE: SDXL's decodes in f32) in TF32 on
// Ampere and newer, as PyTorch's convolutions do by default: `mma.sync` m16n8k8 on 8 input
// channels a step, so a shared row is again 32 bytes (8 values of 4) and every address,
// swizzle and `ldmatrix` is the f16 kernel's (a TF32 fragment is an 8×8 `ldmatrix` of 16-bit
// values read as 8 rows of 4 32-bit ones). Input values are rounded to TF32 as they are
// stored; the weights, copied as they are, lose their low bits in the tensor cores.
//
// Requirements the host checks: c_in a multiple of the step's channels (16 in f16, 8 in
// f32), contiguous, splits ≤ c_in / that. Output channels past the last (a model's last
// convolution has 3 or 4) and cells past the image's edge are computed from zeros and not
// written.
#include <cuda_fp16.h>
#include <stdint.h>

#include "conversions.cuh"
#include "mma.cuh"

namespace {

constexpr uint32_t WARPS = 4;
constexpr uint32_t THREADS = 32 * WARPS;
constexpr uint32_t TILE_M = 64;   // output channels a block
constexpr uint32_t TILE_N = 128;  // output cells a block
constexpr uint32_t TAPS = 9;
constexpr uint32_t ROW_BYTES = 32;  // a shared row: a step's channels of one pixel or tap

// What the element type decides: the input channels a step of K takes (a shared row's
// values, 32 bytes), and the tensor-core step that multiplies them.
template <typename T>
struct Step;
template <>
struct Step<__half> {
  static constexpr uint32_t CHANNELS = 16;
  // One m16n8k16: the fragments hold the step's 16 channels.
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_16816(d, a, b0, b1);
  }
  // A value as the shared rows hold it.
  static __device__ __forceinline__ __half for_mma(__half x) { return x; }
};
template <>
struct Step<float> {
  static constexpr uint32_t CHANNELS = 8;
  // One m16n8k8 in TF32: the fragments hold the step's 8 channels.
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_1688_tf32(d, a, b0, b1);
  }
  static __device__ __forceinline__ float for_mma(float x) { return to_tf32(x); }
};

// The halo pixels of a tile 8 or 16 columns wide: its cells with a row and a column either
// side.
constexpr uint32_t MAX_HALO = (TILE_N / 8 + 2) * (8 + 2);
static_assert(MAX_HALO == (TILE_N / 16 + 2) * (16 + 2), "both tile widths' halos fit");

// A plane's group norm: y = (x − mean) · scale + shift, then SiLU where asked, rounded to
// the storage type once (the arithmetic of `group_norm.cu`'s `PlaneAffine`, with SiLU's
// division a fast one: each value is normalised once per tile of output channels that reads
// it, so this runs several times as often as the group norm's own kernel does).
struct Affine {
  float mean;
  float scale;
  float shift;
};

template <typename T>
__device__ __forceinline__ T normalise(const Affine& affine, T x, uint32_t silu) {
  float y = (to_float(x) - affine.mean) * affine.scale + affine.shift;
  if (silu) {
    y = __fdividef(y, 1.0f + __expf(-y));
  }
  return from_float<T>(y);
}

// Where half `half` (its first 16 bytes or its last) of a shared row of `T` is, in values:
// rows are 32 bytes with no padding, and the two halves swap places in every other group of
// 4 rows (`key`: the row's index among those an `ldmatrix` reads together: the output
// channel, the halo pixel). 8 consecutive rows, 32 bytes (halo) or 288 (weights: 9 taps)
// apart, then fall on all 32 banks; unswizzled, rows 4 apart would share theirs. No padding
// keeps a block's shared memory at 24.6 KB, so 3 blocks fit the 100 KB of an RTX 30 or 40
// SM.
template <typename T>
__device__ __forceinline__ uint32_t half_at(uint32_t half, uint32_t key) {
  return 16 / sizeof(T) * (half ^ ((key >> 2) & 1));
}

template <typename T, bool NORMALIZED>
__device__ void conv3x3(const T* __restrict__ input, const float* __restrict__ affines,
                        const T* __restrict__ weights, const T* __restrict__ bias,
                        T* __restrict__ out, float* __restrict__ partials,
                        uint32_t in_channels, uint32_t out_channels, uint32_t height,
                        uint32_t width, uint32_t shift, uint32_t tile_columns, uint32_t silu,
                        uint32_t splits) {
  if ((tile_columns != 8 && tile_columns != 16) || splits == 0) {
    return;  // a halo the shared memory does not hold: nothing written, which the check sees
  }
  constexpr uint32_t CHUNK = Step<T>::CHANNELS;  // input channels a step of K
  constexpr uint32_t ROW = ROW_BYTES / sizeof(T);  // a shared row, in values (= CHUNK)
  constexpr uint32_t HALF_ROW = ROW / 2;           // the values of one 16-byte half
  static_assert(ROW == CHUNK, "a shared row holds one step's channels");
  __shared__ __align__(16) T a_s[TILE_M * TAPS * ROW];  // [output channel][tap][ROW]
  __shared__ __align__(16) T h_s[MAX_HALO * ROW];       // [halo pixel][ROW]
  __shared__ Affine affine_s[2][CHUNK];                 // this chunk's, the next one's

  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t g = lane / 4;
  const uint32_t t = lane % 4;
  const uint32_t warp_m = warp % 2;  // rows 32 · warp_m … of the block's 64 outputs
  const uint32_t warp_n = warp / 2;  // cells 64 · warp_n … of its 128

  const uint32_t out_height = height << shift;
  const uint32_t out_width = width << shift;
  const uint32_t tile_rows = TILE_N / tile_columns;
  const uint32_t halo_columns = tile_columns + 2;
  const uint32_t halo_pixels = (tile_rows + 2) * halo_columns;
  const uint32_t tiles_across = (out_width + tile_columns - 1) / tile_columns;
  const uint32_t top = blockIdx.x / tiles_across * tile_rows;
  const uint32_t left = blockIdx.x % tiles_across * tile_columns;
  const uint32_t first_output = blockIdx.y * TILE_M;
  const uint32_t images = gridDim.z / splits;
  const uint32_t image = blockIdx.z % images;
  const uint32_t split = blockIdx.z / images;
  const uint32_t chunks = in_channels / CHUNK;
  // This block's share of K: chunks [first_chunk, end_chunk), all of them unsplit.
  const uint32_t first_chunk = split * chunks / splits;
  const uint32_t end_chunk = (split + 1) * chunks / splits;
  const size_t plane_len = static_cast<size_t>(height) * width;
  const T* image_in = input + static_cast<size_t>(image) * in_channels * plane_len;

  // The affines of chunk `chunk` into `affine_s[buffer]` (by the first CHUNK threads).
  const auto load_affines = [&](uint32_t buffer, uint32_t chunk) {
    if constexpr (NORMALIZED) {
      if (threadIdx.x < CHUNK) {
        const float* at =
            affines + (static_cast<size_t>(image) * in_channels + chunk * CHUNK + threadIdx.x) * 3;
        affine_s[buffer][threadIdx.x] = {at[0], at[1], at[2]};
      }
    }
  };

  // Where this lane's `ldmatrix` rows of the halo start, per pair of 8-cell tiles, at tap
  // (0, 0): matrix m of a pair is cells 8 · (m / 2) + 0…7, half m % 2 of their rows (channels
  // 8 · (m % 2) + 0…7 in f16, 4 · (m % 2) + 0…3 in f32).
  uint32_t b_pixels[4];
  #pragma unroll
  for (uint32_t pair = 0; pair < 4; ++pair) {
    const uint32_t cell = warp_n * 64 + pair * 16 + 8 * (lane / 16) + lane % 8;
    b_pixels[pair] = (cell / tile_columns) * halo_columns + cell % tile_columns;
  }
  const uint32_t b_half = (lane / 8) % 2;

  float acc[2][8][4];
  #pragma unroll
  for (uint32_t mi = 0; mi < 2; ++mi) {
    #pragma unroll
    for (uint32_t nt = 0; nt < 8; ++nt) {
      #pragma unroll
      for (uint32_t i = 0; i < 4; ++i) {
        acc[mi][nt][i] = 0.0f;
      }
    }
  }

  load_affines(first_chunk % 2, first_chunk);
  if constexpr (NORMALIZED) {
    __syncthreads();
  }
  for (uint32_t chunk = first_chunk; chunk < end_chunk; ++chunk) {
    // The weights: 64 rows of 9 taps × a step's channels, 288 contiguous bytes each.
    for (uint32_t i = threadIdx.x; i < TILE_M * TAPS * 2; i += THREADS) {
      const uint32_t half_row = i % 2;
      const uint32_t tap = i / 2 % TAPS;
      const uint32_t row = i / (2 * TAPS);
      // Rows past the last output channel are zeros (their outputs are not written).
      const bool inside = first_output + row < out_channels;
      const T* source =
          inside ? weights +
                       ((static_cast<size_t>(first_output + row) * chunks + chunk) * TAPS + tap) *
                           CHUNK +
                       HALF_ROW * half_row
                 : weights;
      copy_16(a_s + (row * TAPS + tap) * ROW + half_at<T>(half_row, row), source, inside);
    }
    commit_copies();

    // The halo: half a row (8 channels in f16, 4 in f32) of one pixel per item, neighbouring
    // lanes on neighbouring pixels.
    const Affine* chunk_affines = affine_s[chunk % 2];
    for (uint32_t i = threadIdx.x; i < halo_pixels * 2; i += THREADS) {
      const uint32_t half_row = i / halo_pixels;
      const uint32_t pixel = i % halo_pixels;
      const int y = static_cast<int>(top + pixel / halo_columns) - 1;
      const int x = static_cast<int>(left + pixel % halo_columns) - 1;
      T values[HALF_ROW];
      #pragma unroll
      for (uint32_t j = 0; j < HALF_ROW; ++j) {
        values[j] = from_float<T>(0.0f);
      }
      if (y >= 0 && y < static_cast<int>(out_height) && x >= 0 &&
          x < static_cast<int>(out_width)) {
        const size_t at = static_cast<size_t>(static_cast<uint32_t>(y) >> shift) * width +
                          (static_cast<uint32_t>(x) >> shift);
        const uint32_t first_channel = chunk * CHUNK + HALF_ROW * half_row;
        const T* source = image_in + first_channel * plane_len + at;
        #pragma unroll
        for (uint32_t j = 0; j < HALF_ROW; ++j) {
          T value = source[j * plane_len];
          if constexpr (NORMALIZED) {
            value = normalise(chunk_affines[HALF_ROW * half_row + j], value, silu);
          }
          values[j] = Step<T>::for_mma(value);
        }
      }
      uint4 packed;
      memcpy(&packed, values, sizeof(packed));
      *reinterpret_cast<uint4*>(h_s + pixel * ROW + half_at<T>(half_row, pixel)) = packed;
    }
    // The next chunk's affines: that buffer was last read before the previous barrier.
    if (chunk + 1 < end_chunk) {
      load_affines((chunk + 1) % 2, chunk + 1);
    }
    wait_copies<0>();
    __syncthreads();

    #pragma unroll
    for (uint32_t tap = 0; tap < TAPS; ++tap) {
      const uint32_t tap_pixels = tap / 3 * halo_columns + tap % 3;
      uint32_t a[2][4];
      #pragma unroll
      for (uint32_t mi = 0; mi < 2; ++mi) {
        const uint32_t row = warp_m * 32 + mi * 16 + lane % 16;
        ldmatrix_x4<false>(a[mi], a_s + (row * TAPS + tap) * ROW + half_at<T>(lane / 16, row));
      }
      #pragma unroll
      for (uint32_t pair = 0; pair < 4; ++pair) {
        uint32_t b[4];
        const uint32_t pixel = b_pixels[pair] + tap_pixels;
        ldmatrix_x4<false>(b, h_s + pixel * ROW + half_at<T>(b_half, pixel));
        #pragma unroll
        for (uint32_t mi = 0; mi < 2; ++mi) {
          Step<T>::mma(acc[mi][2 * pair], a[mi], b[0], b[1]);
          Step<T>::mma(acc[mi][2 * pair + 1], a[mi], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this chunk's weights and halo
  }

  // out = acc + bias, rounded once; or, K split, this split's sums as they are. Outputs past
  // the channels or the edge are not written.
  const size_t out_plane_len = static_cast<size_t>(out_height) * out_width;
  #pragma unroll
  for (uint32_t mi = 0; mi < 2; ++mi) {
    #pragma unroll
    for (uint32_t high = 0; high < 2; ++high) {
      const uint32_t output = first_output + warp_m * 32 + mi * 16 + g + 8 * high;
      if (output >= out_channels) {
        continue;
      }
      const float output_bias = splits == 1 ? to_float(bias[output]) : 0.0f;
      const size_t plane = static_cast<size_t>(image) * out_channels + output;
      // Where the plane starts in `out`, and in `partials` (this split's copy of the output).
      const size_t out_start = plane * out_plane_len;
      const size_t partial_start =
          (static_cast<size_t>(split) * images * out_channels + plane) * out_plane_len;
      #pragma unroll
      for (uint32_t nt = 0; nt < 8; ++nt) {
        #pragma unroll
        for (uint32_t e = 0; e < 2; ++e) {
          const uint32_t cell = warp_n * 64 + nt * 8 + 2 * t + e;
          const uint32_t y = top + cell / tile_columns;
          const uint32_t x = left + cell % tile_columns;
          if (y < out_height && x < out_width) {
            const size_t at = static_cast<size_t>(y) * out_width + x;
            const float sum = acc[mi][nt][2 * high + e];
            if (splits == 1) {
              out[out_start + at] = from_float<T>(sum + output_bias);
            } else {
              partials[partial_start + at] = sum;
            }
          }
        }
      }
    }
  }
}

}  // namespace

// Both take the same arguments: `affines`, (batch · c_in) × (mean, scale, shift) in f32 from
// `group_norm_affines_*`, and `silu` are read by the normalised one only (null and 0 for the
// other). With `splits` 1 they write `out` and not `partials` (which may be null); with more,
// `partials` (splits × the output, f32) and not `out`. The grid: x over the tiles of cells,
// y over the tiles of output channels, z over splits × images.
//
// Three blocks an SM (at most 168 registers a thread), where the shared memory holds three
// (all but Turing's 64 KB): ptxas otherwise spends up to 208 on sm_120 and leaves room for
// two.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define BLOCKS_PER_SM 2
#else
#define BLOCKS_PER_SM 3
#endif
#define CONV3X3(NAME, T, NORMALIZED)                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)                       \
      NAME(const T* input, const float* affines, const T* weights, const T* bias, T* out,    \
           float* partials, uint32_t in_channels, uint32_t out_channels, uint32_t height,     \
           uint32_t width, uint32_t shift, uint32_t tile_columns, uint32_t silu,             \
           uint32_t splits) {                                                                \
    conv3x3<T, NORMALIZED>(input, affines, weights, bias, out, partials, in_channels,        \
                           out_channels, height, width, shift, tile_columns, silu, splits);  \
  }

CONV3X3(conv3x3_f16, __half, false)
CONV3X3(conv3x3_normalized_f16, __half, true)
// f32 in TF32: launched on sm_80 and newer only (on Turing their tensor-core step traps).
CONV3X3(conv3x3_tf32, float, false)
CONV3X3(conv3x3_normalized_tf32, float, true)

// out[i] = Σ over the splits of partials[split][i], in order, plus its channel's bias, rounded
// to the storage type once: `planes` output planes (images × out_channels) of `plane_len`
// cells.
template <typename T>
__device__ void sum_splits(const float* __restrict__ partials, const T* __restrict__ bias,
                           T* __restrict__ out, uint32_t splits, uint32_t planes,
                           uint32_t out_channels, uint32_t plane_len) {
  const size_t total = static_cast<size_t>(planes) * plane_len;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float sum = to_float(bias[i / plane_len % out_channels]);
    for (uint32_t split = 0; split < splits; ++split) {
      sum += partials[split * total + i];
    }
    out[i] = from_float<T>(sum);
  }
}

#define SUM_SPLITS(NAME, T)                                                                  \
  extern "C" __global__ void NAME(const float* partials, const T* bias, T* out,              \
                                  uint32_t splits, uint32_t planes, uint32_t out_channels,   \
                                  uint32_t plane_len) {                                      \
    sum_splits<T>(partials, bias, out, splits, planes, out_channels, plane_len);             \
  }

SUM_SPLITS(conv3x3_sum_splits_f16, __half)
SUM_SPLITS(conv3x3_sum_splits_f32, float)
