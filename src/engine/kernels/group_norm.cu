// Group normalisation of a contiguous (batch, channels, ...) tensor, followed by the
// per-channel affine and, optionally, SiLU: what candle composes from ~14 kernels, each a
// full pass over memory, done here in two.
//
// 1. `group_norm_stats_*`: one block per (split, row), where a row is one group of one image
//    (`channels / groups` whole planes, contiguous). Each block reduces its split of the row
//    to moments (count, mean, M2) and writes them to `partials[row][split]`.
// 2. `group_norm_apply_*`: one block column per (image, channel) plane. The first warp merges
//    the row's partial moments (Chan's parallel formula, exact in any order), then every
//    thread normalises its elements, applies the channel's weight and bias, and SiLU.
//
// Statistics are in f32 whatever the input (as candle and PyTorch do for f16), the variance
// is the biased one (divided by the count), and the output is rounded to the input's type
// once, after the affine and the activation.
#include <cuda_fp16.h>
#include <stdint.h>

#include "conversions.cuh"

namespace {

constexpr int THREADS = 256;
constexpr unsigned FULL_WARP = 0xffffffffu;

struct Moments {
  float count;
  float mean;
  float m2;  // sum of squared deviations from the mean
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float count = a.count + b.count;
  if (count == 0.0f) {
    return a;
  }
  const float delta = b.mean - a.mean;
  const float share = b.count / count;
  Moments merged;
  merged.count = count;
  merged.mean = a.mean + delta * share;
  merged.m2 = a.m2 + b.m2 + delta * delta * a.count * share;
  return merged;
}

// Merges the moments of a whole warp into lane 0 (every lane must take part).
__device__ __forceinline__ Moments warp_merge(Moments m) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments other;
    other.count = __shfl_down_sync(FULL_WARP, m.count, offset);
    other.mean = __shfl_down_sync(FULL_WARP, m.mean, offset);
    other.m2 = __shfl_down_sync(FULL_WARP, m.m2, offset);
    m = merge(m, other);
  }
  return m;
}

template <typename T>
__device__ void stats(const T* __restrict__ x, float* __restrict__ partials, uint32_t row_len,
                      uint32_t split_len) {
  const uint32_t row = blockIdx.y;
  const uint32_t split = blockIdx.x;
  const T* row_x = x + static_cast<size_t>(row) * row_len;
  const uint32_t begin = split * split_len;
  const uint32_t end = min(begin + split_len, row_len);

  // Sums shifted by the row's first value, so that a mean far from 0 cancels nothing.
  const float pivot = to_float(row_x[0]);
  float sum = 0.0f;
  float sum_sq = 0.0f;
  float count = 0.0f;
  for (uint32_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float d = to_float(row_x[i]) - pivot;
    sum += d;
    sum_sq += d * d;
    count += 1.0f;
  }
  Moments m;
  m.count = count;
  m.mean = count > 0.0f ? pivot + sum / count : 0.0f;
  m.m2 = count > 0.0f ? fmaxf(sum_sq - sum * sum / count, 0.0f) : 0.0f;
  m = warp_merge(m);

  __shared__ Moments warps[THREADS / 32];
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t warp = threadIdx.x / 32;
  if (lane == 0) {
    warps[warp] = m;
  }
  __syncthreads();
  if (warp == 0) {
    Moments w = lane < blockDim.x / 32 ? warps[lane] : Moments{0.0f, 0.0f, 0.0f};
    w = warp_merge(w);
    if (lane == 0) {
      float* out = partials + (static_cast<size_t>(row) * gridDim.x + split) * 3;
      out[0] = w.count;
      out[1] = w.mean;
      out[2] = w.m2;
    }
  }
}

template <typename T>
__device__ void apply(const T* __restrict__ x, const float* __restrict__ partials,
                      const T* __restrict__ weight, const T* __restrict__ bias,
                      T* __restrict__ out, uint32_t channels, uint32_t channels_per_group,
                      uint32_t plane_len, uint32_t splits, float eps, uint32_t silu) {
  const uint32_t plane = blockIdx.y;  // image * channels + channel
  const uint32_t channel = plane % channels;
  const uint32_t groups = channels / channels_per_group;
  const uint32_t row = (plane / channels) * groups + channel / channels_per_group;

  __shared__ float mean_scale_bias[3];
  if (threadIdx.x < 32) {
    const float* p = partials + static_cast<size_t>(row) * splits * 3;
    Moments m = {0.0f, 0.0f, 0.0f};
    for (uint32_t s = threadIdx.x; s < splits; s += 32) {
      const Moments part = {p[s * 3], p[s * 3 + 1], p[s * 3 + 2]};
      m = merge(m, part);
    }
    m = warp_merge(m);
    if (threadIdx.x == 0) {
      mean_scale_bias[0] = m.mean;
      mean_scale_bias[1] = to_float(weight[channel]) / sqrtf(m.m2 / m.count + eps);
      mean_scale_bias[2] = to_float(bias[channel]);
    }
  }
  __syncthreads();
  const float mean = mean_scale_bias[0];
  const float scale = mean_scale_bias[1];
  const float shift = mean_scale_bias[2];

  const T* plane_x = x + static_cast<size_t>(plane) * plane_len;
  T* plane_out = out + static_cast<size_t>(plane) * plane_len;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < plane_len;
       i += gridDim.x * blockDim.x) {
    float y = (to_float(plane_x[i]) - mean) * scale + shift;
    if (silu) {
      y = y / (1.0f + __expf(-y));
    }
    plane_out[i] = from_float<T>(y);
  }
}

}  // namespace

#define GROUP_NORM(NAME, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(THREADS)                                     \
      group_norm_stats_##NAME(const T* x, float* partials, uint32_t row_len,                \
                              uint32_t split_len) {                                         \
    stats<T>(x, partials, row_len, split_len);                                              \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS) group_norm_apply_##NAME(            \
      const T* x, const float* partials, const T* weight, const T* bias, T* out,            \
      uint32_t channels, uint32_t channels_per_group, uint32_t plane_len, uint32_t splits, \
      float eps, uint32_t silu) {                                                           \
    apply<T>(x, partials, weight, bias, out, channels, channels_per_group, plane_len,      \
             splits, eps, silu);                                                            \
  }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
