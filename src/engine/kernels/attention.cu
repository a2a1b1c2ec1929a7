// Multi-head softmax attention in one kernel, the flash-attention way: the score matrix is
// never written to memory. Each block takes `16 × warps` query rows of one (image, head),
// walks the keys a tile at a time and keeps, per query row, the running maximum and sum of
// the softmax and the running weighted sum of values (online softmax), all in f32.
//
// Per key tile, each warp (16 query rows):
//   1. scores S = Q·Kᵀ on the tensor cores (WMMA, f16 inputs, f32 accumulators);
//   2. the softmax update: new row maximum, P = exp(S·scale − max) rounded to f16, the row
//      sums and the running output rescaled by exp(old max − new max);
//   3. O += P·V on the tensor cores.
// The running output lives in shared memory (f32), so its per-row rescale needs no
// knowledge of the accumulator fragments' register layout.
//
// Inputs are laid out as the projections leave them: `(batch, tokens, heads · head_dim)`,
// contiguous; the output is written the same way, ready for the output projection, so no
// head-layout copies are needed on either side. Head dims up to 256; each is padded to a
// multiple of 16 with zeros in shared memory (SD 1.5's 40 becomes 48), keys past the end
// are masked, query rows past the end are computed on zeros and not written.
//
// Shared memory (dynamic; the host computes the same sizes, `shared_bytes` in
// `cuda/attention.rs`), with `dp` the padded head dim and `rows = 16 × warps`:
//   Q rows × (dp + 8) f16 | K, V key_tile × (dp + 8) f16 each | S rows × (key_tile + 4) f32 |
//   P rows × (key_tile + 8) f16 | O rows × (dp + 4) f32
// Every part starts at a multiple of 256 bytes, and every fragment at a multiple of 32, as
// WMMA requires; the row padding spreads rows over the memory banks.
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

// The block's dynamic shared memory (the CPU emulation of our tests supplies its own).
#ifndef DYNAMIC_SHARED_MEMORY
#define DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(256) unsigned char name[]
#endif

namespace {

using namespace nvcuda;

constexpr uint32_t FRAGMENT = 16;  // WMMA's m = n = k for f16
constexpr unsigned FULL_WARP = 0xffffffffu;

using MatrixA = wmma::fragment<wmma::matrix_a, FRAGMENT, FRAGMENT, FRAGMENT, __half,
                               wmma::row_major>;
using MatrixBRows = wmma::fragment<wmma::matrix_b, FRAGMENT, FRAGMENT, FRAGMENT, __half,
                                   wmma::row_major>;
using MatrixBColumns = wmma::fragment<wmma::matrix_b, FRAGMENT, FRAGMENT, FRAGMENT, __half,
                                      wmma::col_major>;
using Accumulator = wmma::fragment<wmma::accumulator, FRAGMENT, FRAGMENT, FRAGMENT, float>;

// Copies `count` rows of `head_dim` values into shared rows `ld` apart, padded with zeros to
// `dp`: row r from `source + (first + r) · stride`, zeros for rows at or past `limit`. With
// `vectors` (the host's word that head_dim and every offset are multiples of 8 values) 16
// bytes at a time, else one value at a time.
__device__ __forceinline__ void copy_rows(__half* __restrict__ destination, uint32_t ld,
                                          const __half* __restrict__ source, size_t stride,
                                          uint32_t first, uint32_t count, uint32_t limit,
                                          uint32_t head_dim, uint32_t dp, uint32_t vectors) {
  if (vectors) {
    const uint32_t chunks = dp / 8;
    for (uint32_t i = threadIdx.x; i < count * chunks; i += blockDim.x) {
      const uint32_t row = i / chunks;
      const uint32_t column = i % chunks * 8;
      const uint32_t index = first + row;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (index < limit && column < head_dim) {
        value = *reinterpret_cast<const uint4*>(source + index * stride + column);
      }
      *reinterpret_cast<uint4*>(destination + row * ld + column) = value;
    }
    return;
  }
  const __half zero = __float2half(0.0f);
  for (uint32_t i = threadIdx.x; i < count * dp; i += blockDim.x) {
    const uint32_t row = i / dp;
    const uint32_t column = i % dp;
    const uint32_t index = first + row;
    destination[row * ld + column] =
        index < limit && column < head_dim ? source[index * stride + column] : zero;
  }
}

__device__ void attention(const __half* __restrict__ q, const __half* __restrict__ k,
                          const __half* __restrict__ v, __half* __restrict__ out,
                          uint32_t heads, uint32_t queries, uint32_t keys, uint32_t head_dim,
                          uint32_t key_tile, float scale_log2, uint32_t vectors) {
  const uint32_t warps = blockDim.x / 32;
  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t rows = warps * FRAGMENT;
  const uint32_t dp = (head_dim + FRAGMENT - 1) / FRAGMENT * FRAGMENT;

  const uint32_t ld_h = dp + 8;         // Q, K, V rows, in halves
  const uint32_t ld_s = key_tile + 4;   // scores, in floats
  const uint32_t ld_p = key_tile + 8;   // probabilities, in halves
  const uint32_t ld_o = dp + 4;         // running output, in floats

  DYNAMIC_SHARED_MEMORY(shared);
  __half* q_s = reinterpret_cast<__half*>(shared);
  __half* k_s = q_s + rows * ld_h;
  __half* v_s = k_s + key_tile * ld_h;
  float* s_s = reinterpret_cast<float*>(v_s + key_tile * ld_h);
  __half* p_s = reinterpret_cast<__half*>(s_s + rows * ld_s);
  float* o_s = reinterpret_cast<float*>(p_s + rows * ld_p);

  // This warp's 16 rows of each per-row buffer.
  const __half* q_w = q_s + warp * FRAGMENT * ld_h;
  float* s_w = s_s + warp * FRAGMENT * ld_s;
  __half* p_w = p_s + warp * FRAGMENT * ld_p;
  float* o_w = o_s + warp * FRAGMENT * ld_o;

  const uint32_t image = blockIdx.y / heads;
  const uint32_t head = blockIdx.y % heads;
  const uint32_t first_query = blockIdx.x * rows;
  const size_t token_stride = static_cast<size_t>(heads) * head_dim;
  const size_t head_offset = static_cast<size_t>(head) * head_dim;
  const __half* q_head = q + static_cast<size_t>(image) * queries * token_stride + head_offset;
  const __half* k_head = k + static_cast<size_t>(image) * keys * token_stride + head_offset;
  const __half* v_head = v + static_cast<size_t>(image) * keys * token_stride + head_offset;
  __half* out_head = out + static_cast<size_t>(image) * queries * token_stride + head_offset;

  const __half zero = __float2half(0.0f);
  copy_rows(q_s, ld_h, q_head, token_stride, first_query, rows, queries, head_dim, dp, vectors);
  for (uint32_t i = threadIdx.x; i < rows * ld_o; i += blockDim.x) {
    o_s[i] = 0.0f;
  }

  // Two lanes per query row: `row` of this warp's 16, columns of parity `part`.
  const uint32_t row = lane / 2;
  const uint32_t part = lane % 2;
  float* s_row = s_w + row * ld_s;
  __half* p_row = p_w + row * ld_p;
  float* o_row = o_w + row * ld_o;
  float running_max = -INFINITY;
  float running_sum = 0.0f;

  for (uint32_t first_key = 0; first_key < keys; first_key += key_tile) {
    __syncthreads();  // every warp is done with the previous tile (and Q, O are written)
    copy_rows(k_s, ld_h, k_head, token_stride, first_key, key_tile, keys, head_dim, dp, vectors);
    copy_rows(v_s, ld_h, v_head, token_stride, first_key, key_tile, keys, head_dim, dp, vectors);
    __syncthreads();

    // 1. S = Q·Kᵀ: Kᵀ read column-major from K's rows.
    for (uint32_t n = 0; n < key_tile; n += FRAGMENT) {
      Accumulator scores;
      wmma::fill_fragment(scores, 0.0f);
      for (uint32_t d = 0; d < dp; d += FRAGMENT) {
        MatrixA query_part;
        MatrixBColumns key_part;
        wmma::load_matrix_sync(query_part, q_w + d, ld_h);
        wmma::load_matrix_sync(key_part, k_s + n * ld_h + d, ld_h);
        wmma::mma_sync(scores, query_part, key_part, scores);
      }
      wmma::store_matrix_sync(s_w + n, scores, ld_s, wmma::mem_row_major);
    }
    __syncwarp();

    // 2. The online softmax, in base 2 (exp2 of scores pre-multiplied by log2(e)).
    const uint32_t valid = min(key_tile, keys - first_key);
    float tile_max = -INFINITY;
    for (uint32_t c = part; c < valid; c += 2) {
      tile_max = fmaxf(tile_max, s_row[c] * scale_log2);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(FULL_WARP, tile_max, 1));
    const float new_max = fmaxf(running_max, tile_max);  // finite: the tile has a key
    const float rescale = exp2f(running_max - new_max);  // 0 on the first tile
    float tile_sum = 0.0f;
    for (uint32_t c = part; c < key_tile; c += 2) {
      const __half p = c < valid ? __float2half(exp2f(s_row[c] * scale_log2 - new_max)) : zero;
      p_row[c] = p;
      tile_sum += __half2float(p);  // the weights P·V will use, as rounded
    }
    tile_sum += __shfl_xor_sync(FULL_WARP, tile_sum, 1);
    running_sum = running_sum * rescale + tile_sum;
    running_max = new_max;
    for (uint32_t c = part; c < dp; c += 2) {
      o_row[c] *= rescale;
    }
    __syncwarp();

    // 3. O += P·V.
    for (uint32_t d = 0; d < dp; d += FRAGMENT) {
      Accumulator output;
      wmma::load_matrix_sync(output, o_w + d, ld_o, wmma::mem_row_major);
      for (uint32_t n = 0; n < key_tile; n += FRAGMENT) {
        MatrixA weights;
        MatrixBRows values;
        wmma::load_matrix_sync(weights, p_w + n, ld_p);
        wmma::load_matrix_sync(values, v_s + n * ld_h + d, ld_h);
        wmma::mma_sync(output, weights, values, output);
      }
      wmma::store_matrix_sync(o_w + d, output, ld_o, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // O / sum, rounded once; each warp writes its rows, a row's columns by consecutive lanes.
  if (part == 0) {
    s_row[0] = 1.0f / running_sum;
  }
  __syncwarp();
  for (uint32_t i = lane; i < FRAGMENT * head_dim; i += 32) {
    const uint32_t r = i / head_dim;
    const uint32_t column = i % head_dim;
    const uint32_t query = first_query + warp * FRAGMENT + r;
    if (query < queries) {
      out_head[query * token_stride + column] =
          __float2half(o_w[r * ld_o + column] * s_w[r * ld_s]);
    }
  }
}

}  // namespace

extern "C" __global__ void attention_f16(const __half* q, const __half* k, const __half* v,
                                         __half* out, uint32_t heads, uint32_t queries,
                                         uint32_t keys, uint32_t head_dim, uint32_t key_tile,
                                         float scale_log2, uint32_t vectors) {
  attention(q, k, v, out, heads, queries, keys, head_dim, key_tile, scale_log2, vectors);
}
