// Multi-head softmax attention with everything a warp computes held in registers, the way
// FlashAttention-2 does it: the sibling of `attention.cu` (WMMA, which passes its scores,
// probabilities and running output through shared memory because WMMA hides the fragments'
// register layout). Here the tensor-core instruction is `mma.sync` m16n8k16, whose fragment
// layout is documented (PTX ISA, "Matrix Fragments for mma.m16n8k16"), so:
//   - a warp's 16 query rows stay in registers as A fragments for the whole kernel;
//   - the scores S = Q·Kᵀ come out of the tensor cores as accumulators, and the online
//     softmax runs on them in registers (row maxima and sums across the 4 lanes sharing a
//     row, by shuffles);
//   - the accumulators of S, as probabilities rounded to f16, are already the A fragments of
//     P·V (the C layout of two 16×8 tiles is the A layout of one 16×16), so P never leaves
//     the registers either;
//   - the running output is accumulators too, rescaled in place.
// Only K and V pass through shared memory, once per key tile for the block's 4 warps (64
// query rows), both stored as they come (a row per key, copied 16 bytes at a time). On
// Ampere and newer the copies are `cp.async` and overlap the work, as FlashAttention-2's do:
// a tile's V arrives while its scores are computed, the next tile's K while its P·V is. The
// B
// fragments come from there by `ldmatrix`, four 8×8 matrices per instruction: Kᵀ's are pairs
// along K's rows (as stored), V's pairs down its columns (`.trans`: each block transposed
// on its way into registers). Row strides of 8 halves more than the data spread a warp's
// writes and each `ldmatrix` phase's 8 rows over all 32 banks. (Storing V transposed
// instead, as this kernel first did, took two 16-bit writes per pair that 8 lanes at a time
// sent to the same bank.)
//
// The same layouts as `attention.cu`: inputs `(batch, tokens, heads · head_dim)` as the
// projections leave them, output the same way. The head dim (a multiple of 8, as every SD
// head is, at most 16 · KSTEPS) is padded to 16 · KSTEPS with zeros, and every head's rows
// start on 16 bytes (the host checks both; other heads and views take `attention.cu`,
// which copies value by value where it must): so K and V are copied 16 bytes at a time,
// with no second, pairwise copy loop whose registers would cost occupancy. Keys past the
// end are masked, query rows past the end are not written. Scores are scaled in base 2
// (`scale_log2` = scale · log2 e).
//
// The fragment layouts and the instructions are `mma.cuh`'s (Turing, sm_75, does each
// m16n8k16 as two m16n8k8; `ldmatrix` is sm_75 and newer, like the kernel).
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"

namespace {

constexpr uint32_t WARPS = 4;
constexpr uint32_t THREADS = 32 * WARPS;
constexpr uint32_t KEY_TILE = 64;
constexpr uint32_t KEY_GROUPS = KEY_TILE / 8;    // score tiles of 8 keys
constexpr uint32_t KEY_STEPS = KEY_TILE / 16;    // P·V steps of 16 keys
constexpr unsigned FULL_WARP = 0xffffffffu;

// Kᵀ's B fragments for two neighbouring tiles of 8 keys at one step of 16 head columns:
// `keys` points at the first key's row at the step's first column, rows `stride` halves
// apart. Matrix m is keys 8·(m / 2) + 0…7, columns 8·(m % 2) + 0…7, as stored; registers:
// b0 and b1 of the first tile, then of the second.
__device__ __forceinline__ void load_b_keys(uint32_t (&b)[4], const __half* keys,
                                            uint32_t stride) {
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t matrix = lane / 8;
  ldmatrix_x4<false>(b, keys + (lane % 8 + 8 * (matrix / 2)) * stride + 8 * (matrix % 2));
}

// V's B fragments for two neighbouring tiles of 8 head columns over 16 keys: `values` points
// at the first key's row at the first tile's first column, rows `stride` halves apart.
// Matrix m is keys 8·(m % 2) + 0…7, columns 8·(m / 2) + 0…7, transposed; registers: b0 and
// b1 of the first tile, then of the second.
__device__ __forceinline__ void load_b_values(uint32_t (&b)[4], const __half* values,
                                              uint32_t stride) {
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t matrix = lane / 8;
  ldmatrix_x4<true>(b, values + (lane % 8 + 8 * (matrix % 2)) * stride + 8 * (matrix / 2));
}

// One group of copies: KEY_TILE rows of a head's K or V from key `first` into `tile` (rows
// LD halves apart), 8 values at a time (the head dim is a multiple of 8, so a chunk is
// wholly inside it or wholly past it); zeros past the keys and past the head dim.
template <uint32_t DP>
__device__ __forceinline__ void copy_rows(__half* tile, const __half* head, size_t token_stride,
                                          uint32_t first, uint32_t keys, uint32_t head_dim) {
  constexpr uint32_t LD = DP + 8;
  constexpr uint32_t CHUNKS = DP / 8;
  for (uint32_t i = threadIdx.x; i < KEY_TILE * CHUNKS; i += THREADS) {
    const uint32_t key = i / CHUNKS;
    const uint32_t column = i % CHUNKS * 8;
    const bool inside = first + key < keys && column < head_dim;
    const __half* source =
        inside ? head + static_cast<size_t>(first + key) * token_stride + column : head;
    copy_16(tile + key * LD + column, source, inside);
  }
  commit_copies();
}

// Two values rounded to f16 and packed, `low` first (lower column).
__device__ __forceinline__ uint32_t pack(float low, float high) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(low))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(high))) << 16);
}

// The 32 bits at `pair` (two halves, 4-byte aligned).
__device__ __forceinline__ uint32_t load_pair(const __half* pair) {
  return *reinterpret_cast<const uint32_t*>(pair);
}

template <uint32_t KSTEPS>
__device__ void attention_mma(const __half* __restrict__ q, const __half* __restrict__ k,
                              const __half* __restrict__ v, __half* __restrict__ out,
                              uint32_t heads, uint32_t queries, uint32_t keys,
                              uint32_t head_dim, float scale_log2) {
  constexpr uint32_t DP = 16 * KSTEPS;       // the padded head dim
  constexpr uint32_t DIM_GROUPS = DP / 8;    // output tiles of 8 columns (an even count)
  constexpr uint32_t LD = DP + 8;            // K and V rows, in halves (16-byte multiples)
  __shared__ __align__(16) __half k_s[KEY_TILE * LD];
  __shared__ __align__(16) __half v_s[KEY_TILE * LD];

  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t g = lane / 4;
  const uint32_t t = lane % 4;

  const uint32_t image = blockIdx.y / heads;
  const uint32_t head = blockIdx.y % heads;
  const size_t token_stride = static_cast<size_t>(heads) * head_dim;
  const size_t head_offset = static_cast<size_t>(head) * head_dim;
  const __half* q_head = q + static_cast<size_t>(image) * queries * token_stride + head_offset;
  const __half* k_head = k + static_cast<size_t>(image) * keys * token_stride + head_offset;
  const __half* v_head = v + static_cast<size_t>(image) * keys * token_stride + head_offset;
  __half* out_head = out + static_cast<size_t>(image) * queries * token_stride + head_offset;

  // This warp's query rows g and g + 8 (of its 16).
  const uint32_t first_row = blockIdx.x * (16 * WARPS) + warp * 16;
  const uint32_t row_low = first_row + g;
  const uint32_t row_high = first_row + g + 8;

  // Q as A fragments, once: zeros past the rows and past the head dim (a multiple of 8, so
  // a pair is wholly inside or wholly past it).
  uint32_t q_fragments[KSTEPS][4];
  #pragma unroll
  for (uint32_t step = 0; step < KSTEPS; ++step) {
    #pragma unroll
    for (uint32_t half_k = 0; half_k < 2; ++half_k) {
      const uint32_t column = step * 16 + half_k * 8 + 2 * t;
      const bool inside = column < head_dim;
      q_fragments[step][2 * half_k] =
          inside && row_low < queries ? load_pair(q_head + row_low * token_stride + column) : 0;
      q_fragments[step][2 * half_k + 1] =
          inside && row_high < queries ? load_pair(q_head + row_high * token_stride + column)
                                       : 0;
    }
  }

  float output[DIM_GROUPS][4];
  #pragma unroll
  for (uint32_t group = 0; group < DIM_GROUPS; ++group) {
    #pragma unroll
    for (uint32_t i = 0; i < 4; ++i) {
      output[group][i] = 0.0f;
    }
  }
  // Per row (low: g, high: g + 8): the running maximum (base 2, scaled) and this lane's
  // share of the running sum (the 4 lanes of a row add theirs up at the end).
  float max_low = -INFINITY, max_high = -INFINITY;
  float sum_low = 0.0f, sum_high = 0.0f;

  // K and V tiles in flight: each `copy_tile` is one group of copies; a group is this
  // thread's to read once waited for, the block's after a __syncthreads().
  const auto copy_tile = [&](__half* tile, const __half* head, uint32_t first) {
    copy_rows<DP>(tile, head, token_stride, first, keys, head_dim);
  };
  copy_tile(k_s, k_head, 0);
  for (uint32_t first_key = 0; first_key < keys; first_key += KEY_TILE) {
    __syncthreads();  // every warp is done with V's previous tile
    copy_tile(v_s, v_head, first_key);  // arrives while the scores are computed
    wait_copies<1>();                   // this tile's K (all but the newest group)
    __syncthreads();

    // S = Q·Kᵀ: 8 tiles of 8 keys, two per `ldmatrix`. Kᵀ as B (column n = key n).
    float scores[KEY_GROUPS][4];
    #pragma unroll
    for (uint32_t group = 0; group < KEY_GROUPS; ++group) {
      #pragma unroll
      for (uint32_t i = 0; i < 4; ++i) {
        scores[group][i] = 0.0f;
      }
    }
    #pragma unroll
    for (uint32_t group = 0; group < KEY_GROUPS; group += 2) {
      #pragma unroll
      for (uint32_t step = 0; step < KSTEPS; ++step) {
        uint32_t keys_b[4];
        load_b_keys(keys_b, k_s + group * 8 * LD + step * 16, LD);
        mma_16816(scores[group], q_fragments[step], keys_b[0], keys_b[1]);
        mma_16816(scores[group + 1], q_fragments[step], keys_b[2], keys_b[3]);
      }
    }

    // The online softmax, in base 2: masked keys get −∞, so they weigh 0.
    const uint32_t valid = min(KEY_TILE, keys - first_key);
    float tile_max_low = -INFINITY, tile_max_high = -INFINITY;
    #pragma unroll
    for (uint32_t group = 0; group < KEY_GROUPS; ++group) {
      #pragma unroll
      for (uint32_t i = 0; i < 2; ++i) {
        const bool inside = group * 8 + 2 * t + i < valid;
        scores[group][i] = inside ? scores[group][i] * scale_log2 : -INFINITY;
        scores[group][i + 2] = inside ? scores[group][i + 2] * scale_log2 : -INFINITY;
        tile_max_low = fmaxf(tile_max_low, scores[group][i]);
        tile_max_high = fmaxf(tile_max_high, scores[group][i + 2]);
      }
    }
    #pragma unroll
    for (int lanes = 1; lanes < 4; lanes *= 2) {
      tile_max_low = fmaxf(tile_max_low, __shfl_xor_sync(FULL_WARP, tile_max_low, lanes));
      tile_max_high = fmaxf(tile_max_high, __shfl_xor_sync(FULL_WARP, tile_max_high, lanes));
    }
    // Finite: every tile holds at least one key.
    const float new_max_low = fmaxf(max_low, tile_max_low);
    const float new_max_high = fmaxf(max_high, tile_max_high);
    const float rescale_low = exp2f(max_low - new_max_low);  // 0 on the first tile
    const float rescale_high = exp2f(max_high - new_max_high);
    max_low = new_max_low;
    max_high = new_max_high;
    sum_low *= rescale_low;
    sum_high *= rescale_high;
    #pragma unroll
    for (uint32_t group = 0; group < DIM_GROUPS; ++group) {
      output[group][0] *= rescale_low;
      output[group][1] *= rescale_low;
      output[group][2] *= rescale_high;
      output[group][3] *= rescale_high;
    }

    // The next tile's K arrives while P·V runs; this tile's V must be in.
    __syncthreads();  // every warp is done with K's tile
    if (first_key + KEY_TILE < keys) {
      copy_tile(k_s, k_head, first_key + KEY_TILE);
      wait_copies<1>();
    } else {
      wait_copies<0>();
    }
    __syncthreads();

    // P, rounded to f16 as P·V uses it (and summed as rounded), straight into A fragments:
    // key step s covers score tiles 2s (a0, a1) and 2s + 1 (a2, a3).
    #pragma unroll
    for (uint32_t step = 0; step < KEY_STEPS; ++step) {
      uint32_t weights[4];
      #pragma unroll
      for (uint32_t part = 0; part < 2; ++part) {
        float* tile = scores[2 * step + part];
        const __half p0 = __float2half_rn(exp2f(tile[0] - max_low));
        const __half p1 = __float2half_rn(exp2f(tile[1] - max_low));
        const __half p2 = __float2half_rn(exp2f(tile[2] - max_high));
        const __half p3 = __float2half_rn(exp2f(tile[3] - max_high));
        sum_low += __half2float(p0) + __half2float(p1);
        sum_high += __half2float(p2) + __half2float(p3);
        weights[2 * part] = static_cast<uint32_t>(__half_as_ushort(p0)) |
                            (static_cast<uint32_t>(__half_as_ushort(p1)) << 16);
        weights[2 * part + 1] = static_cast<uint32_t>(__half_as_ushort(p2)) |
                                (static_cast<uint32_t>(__half_as_ushort(p3)) << 16);
      }
      // O += P·V over these 16 keys. V as B (k = key, column n = head column n), two output
      // tiles per `ldmatrix`.
      #pragma unroll
      for (uint32_t group = 0; group < DIM_GROUPS; group += 2) {
        uint32_t values[4];
        load_b_values(values, v_s + step * 16 * LD + group * 8, LD);
        mma_16816(output[group], weights, values[0], values[1]);
        mma_16816(output[group + 1], weights, values[2], values[3]);
      }
    }
  }

  wait_copies<0>();  // nothing left in flight (there is always a key: a no-op)

  // O / sum, rounded once: the row's 4 lanes add up their shares of the sum first.
  #pragma unroll
  for (int lanes = 1; lanes < 4; lanes *= 2) {
    sum_low += __shfl_xor_sync(FULL_WARP, sum_low, lanes);
    sum_high += __shfl_xor_sync(FULL_WARP, sum_high, lanes);
  }
  const float inverse_low = 1.0f / sum_low;
  const float inverse_high = 1.0f / sum_high;
  #pragma unroll
  for (uint32_t group = 0; group < DIM_GROUPS; ++group) {
    const uint32_t column = group * 8 + 2 * t;
    if (column >= head_dim) {
      break;
    }
    if (row_low < queries) {
      *reinterpret_cast<uint32_t*>(out_head + row_low * token_stride + column) =
          pack(output[group][0] * inverse_low, output[group][1] * inverse_low);
    }
    if (row_high < queries) {
      *reinterpret_cast<uint32_t*>(out_head + row_high * token_stride + column) =
          pack(output[group][2] * inverse_high, output[group][3] * inverse_high);
    }
  }
}

}  // namespace

// One kernel per padded head dim, 16 · KSTEPS: SD's heads are 40 (48), 64, 80 and 160 (the
// last is `attention.cu`'s). On Ampere and Ada (RTX 30 and 40) the heads up to 64 ask ptxas
// for room for 4 blocks per SM (128 registers a thread), which it makes without spilling;
// the head of 64 would otherwise take 129 to 137 and leave room for 3. Turing (64 KB of
// shared memory per SM: 3 blocks), Hopper and Blackwell would spill a little, and wider
// heads more: those keep what they need (ptxas 13.0, --resource-usage).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && __CUDA_ARCH__ < 900
#define FOUR_BLOCKS_PER_SM __launch_bounds__(THREADS, 4)
#else
#define FOUR_BLOCKS_PER_SM __launch_bounds__(THREADS)
#endif
#define ATTENTION_MMA(KSTEPS, BOUNDS)                                                       \
  extern "C" __global__ void BOUNDS                                                         \
      attention_mma_f16_k##KSTEPS(const __half* q, const __half* k, const __half* v,        \
                                  __half* out, uint32_t heads, uint32_t queries,            \
                                  uint32_t keys, uint32_t head_dim, float scale_log2) {     \
    attention_mma<KSTEPS>(q, k, v, out, heads, queries, keys, head_dim, scale_log2);        \
  }

ATTENTION_MMA(2, FOUR_BLOCKS_PER_SM)
ATTENTION_MMA(3, FOUR_BLOCKS_PER_SM)
ATTENTION_MMA(4, FOUR_BLOCKS_PER_SM)
ATTENTION_MMA(5, __launch_bounds__(THREADS))
ATTENTION_MMA(6, __launch_bounds__(THREADS))
ATTENTION_MMA(8, __launch_bounds__(THREADS))
