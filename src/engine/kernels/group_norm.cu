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
//    Or, where a 3×3 convolution follows, `group_norm_columns_*`: the same values written
//    straight into the convolution's columns for a band of output rows (`columns.cuh`), so
//    the normalised image is never held, written or read. Or `group_norm_affines_*`: each
//    plane's (mean, scale, shift), for `conv3x3.cu`, which normalises as it loads.
//
// Statistics are in f32 whatever the input (as candle and PyTorch do for f16), the variance
// is the biased one (divided by the count), and the output is rounded to the input's type
// once, after the affine and the activation.
#include <cuda_fp16.h>
#include <stdint.h>

#include "columns.cuh"

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

// The normalisation of one (image, channel) plane: y = (x − mean) · scale + shift.
struct PlaneAffine {
  float mean;
  float scale;
  float shift;

  template <typename T>
  __device__ __forceinline__ T operator()(T x, uint32_t silu) const {
    float y = (to_float(x) - mean) * scale + shift;
    if (silu) {
      y = y / (1.0f + __expf(-y));
    }
    return from_float<T>(y);
  }
};

// The affine of plane `plane` (image · channels + channel) from its row's partial moments,
// merged by one warp (every lane of it must call; lane 0 gets the result).
template <typename T>
__device__ PlaneAffine warp_plane_affine(const float* __restrict__ partials,
                                         const T* __restrict__ weight,
                                         const T* __restrict__ bias, uint32_t plane,
                                         uint32_t channels, uint32_t channels_per_group,
                                         uint32_t splits, float eps) {
  const uint32_t channel = plane % channels;
  const uint32_t groups = channels / channels_per_group;
  const uint32_t row = (plane / channels) * groups + channel / channels_per_group;
  const float* p = partials + static_cast<size_t>(row) * splits * 3;
  Moments m = {0.0f, 0.0f, 0.0f};
  for (uint32_t s = threadIdx.x % 32; s < splits; s += 32) {
    const Moments part = {p[s * 3], p[s * 3 + 1], p[s * 3 + 2]};
    m = merge(m, part);
  }
  m = warp_merge(m);
  PlaneAffine affine;
  affine.mean = m.mean;
  affine.scale = to_float(weight[channel]) / sqrtf(m.m2 / m.count + eps);
  affine.shift = to_float(bias[channel]);
  return affine;
}

// The affine of plane `plane` (image · channels + channel): the first warp merges its row's
// partial moments; every thread of the block gets the result (a barrier inside: call it from
// every thread).
template <typename T>
__device__ PlaneAffine plane_affine(const float* __restrict__ partials,
                                    const T* __restrict__ weight, const T* __restrict__ bias,
                                    uint32_t plane, uint32_t channels,
                                    uint32_t channels_per_group, uint32_t splits, float eps) {
  __shared__ PlaneAffine affine;
  if (threadIdx.x < 32) {
    const PlaneAffine merged = warp_plane_affine(partials, weight, bias, plane, channels,
                                                 channels_per_group, splits, eps);
    if (threadIdx.x == 0) {
      affine = merged;
    }
  }
  __syncthreads();
  return affine;
}

// Every plane's affine (mean, scale, shift), f32, for a convolution that normalises as it
// loads (`conv3x3.cu`): a warp per plane. Grid: x over the planes, THREADS / 32 a block.
template <typename T>
__device__ void affines(const float* __restrict__ partials, const T* __restrict__ weight,
                        const T* __restrict__ bias, float* __restrict__ out, uint32_t planes,
                        uint32_t channels, uint32_t channels_per_group, uint32_t splits,
                        float eps) {
  const uint32_t plane = blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  if (plane >= planes) {
    return;  // the warp's lanes leave together
  }
  const PlaneAffine affine = warp_plane_affine(partials, weight, bias, plane, channels,
                                               channels_per_group, splits, eps);
  if (threadIdx.x % 32 == 0) {
    out[plane * 3] = affine.mean;
    out[plane * 3 + 1] = affine.scale;
    out[plane * 3 + 2] = affine.shift;
  }
}

template <typename T>
__device__ void apply(const T* __restrict__ x, const float* __restrict__ partials,
                      const T* __restrict__ weight, const T* __restrict__ bias,
                      T* __restrict__ out, uint32_t channels, uint32_t channels_per_group,
                      uint32_t plane_len, uint32_t splits, float eps, uint32_t silu) {
  const uint32_t plane = blockIdx.y;  // image * channels + channel
  const PlaneAffine affine =
      plane_affine(partials, weight, bias, plane, channels, channels_per_group, splits, eps);
  const T* plane_x = x + static_cast<size_t>(plane) * plane_len;
  T* plane_out = out + static_cast<size_t>(plane) * plane_len;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < plane_len;
       i += gridDim.x * blockDim.x) {
    plane_out[i] = affine(plane_x[i], silu);
  }
}

// `apply`'s values for output rows top … top + rows − 1 of a 3×3 convolution, as its columns
// (`columns.cuh`; never doubled). Grid: x over the band's cells, y over the planes.
template <typename T>
__device__ void apply_columns(const T* __restrict__ x, const float* __restrict__ partials,
                              const T* __restrict__ weight, const T* __restrict__ bias,
                              T* __restrict__ columns, uint32_t channels,
                              uint32_t channels_per_group, uint32_t splits, float eps,
                              uint32_t silu, uint32_t height, uint32_t width, uint32_t top,
                              uint32_t rows) {
  const uint32_t plane = blockIdx.y;
  // Every thread reaches the barrier inside, those past the band's cells too.
  const PlaneAffine affine =
      plane_affine(partials, weight, bias, plane, channels, channels_per_group, splits, eps);
  const T* plane_x = x + static_cast<size_t>(plane) * height * width;
  write_columns_3x3<T>([plane_x, affine, silu](size_t at) { return affine(plane_x[at], silu); },
                       columns, height, width, 0, top, rows);
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
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS) group_norm_columns_##NAME(          \
      const T* x, const float* partials, const T* weight, const T* bias, T* columns,        \
      uint32_t channels, uint32_t channels_per_group, uint32_t splits, float eps,           \
      uint32_t silu, uint32_t height, uint32_t width, uint32_t top, uint32_t rows) {        \
    apply_columns<T>(x, partials, weight, bias, columns, channels, channels_per_group,     \
                     splits, eps, silu, height, width, top, rows);                          \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS) group_norm_affines_##NAME(          \
      const float* partials, const T* weight, const T* bias, float* out, uint32_t planes,   \
      uint32_t channels, uint32_t channels_per_group, uint32_t splits, float eps) {         \
    affines<T>(partials, weight, bias, out, planes, channels, channels_per_group, splits,   \
               eps);                                                                        \
  }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
