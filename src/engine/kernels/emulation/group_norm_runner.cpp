// Runs `group_norm.cu` on the CPU emulation (cuda_emulation.h), for the kernels' tests:
//
//   group_norm_runner DTYPE IMAGES CHANNELS GROUPS PLANE_LEN SPLITS SPLIT_LEN BLOCKS_PER_PLANE
//                     EPS SILU [HEIGHT WIDTH TOP ROWS BLOCKS | affines]
//
// DTYPE is f32 or f16. Reads the input (IMAGES × CHANNELS × PLANE_LEN), the weight and the
// bias (CHANNELS each), little-endian, from stdin; launches the statistics kernel and the
// apply kernel with the grids the host code would; writes the output to stdout the same way.
// With the last five, the columns kernel instead of the apply kernel: the planes are HEIGHT ×
// WIDTH, the output the columns of output rows TOP … TOP + ROWS − 1 (IMAGES · CHANNELS × 9 ×
// ROWS · WIDTH), in BLOCKS × planes blocks. With `affines`, the affines kernel instead: each
// plane's (mean, scale, shift) as f32 (IMAGES · CHANNELS × 3), whatever DTYPE. Partial
// moments and output nobody wrote stay NaN.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda_emulation.h"
#include "../group_norm.cu"

namespace {

struct Settings {
  uint32_t images, channels, groups, plane_len, splits, split_len, blocks_per_plane;
  float eps;
  uint32_t silu;
};

// The columns kernel's band, where it runs.
struct Band {
  uint32_t height, width, top, rows, blocks;
};

template <typename T>
void run(const Settings& s, const Band* band, bool affines) {
  const size_t elements = static_cast<size_t>(s.images) * s.channels * s.plane_len;
  const std::vector<T> x = emulation::read_stdin<T>(elements);
  const std::vector<T> weight = emulation::read_stdin<T>(s.channels);
  const std::vector<T> bias = emulation::read_stdin<T>(s.channels);
  const uint32_t rows = s.images * s.groups;
  const uint32_t row_len = s.channels / s.groups * s.plane_len;
  std::vector<float> partials(static_cast<size_t>(rows) * s.splits * 3, NAN);

  const dim3 threads{THREADS, 1, 1};
  emulation::launch(dim3{s.splits, rows, 1}, threads, 0, [&] {
    if constexpr (std::is_same_v<T, float>) {
      group_norm_stats_f32(x.data(), partials.data(), row_len, s.split_len);
    } else {
      group_norm_stats_f16(x.data(), partials.data(), row_len, s.split_len);
    }
  });
  const uint32_t channels_per_group = s.channels / s.groups;
  if (affines) {
    const uint32_t planes = s.images * s.channels;
    std::vector<float> out(static_cast<size_t>(planes) * 3, NAN);
    const uint32_t warps = THREADS / 32;
    emulation::launch(dim3{(planes + warps - 1) / warps, 1, 1}, threads, 0, [&] {
      if constexpr (std::is_same_v<T, float>) {
        group_norm_affines_f32(partials.data(), weight.data(), bias.data(), out.data(), planes,
                               s.channels, channels_per_group, s.splits, s.eps);
      } else {
        group_norm_affines_f16(partials.data(), weight.data(), bias.data(), out.data(), planes,
                               s.channels, channels_per_group, s.splits, s.eps);
      }
    });
    std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    return;
  }
  if (band != nullptr) {
    const uint32_t planes = s.images * s.channels;
    std::vector<T> columns(static_cast<size_t>(planes) * 9 * band->rows * band->width,
                           from_float<T>(NAN));
    emulation::launch(dim3{band->blocks, planes, 1}, threads, 0, [&] {
      if constexpr (std::is_same_v<T, float>) {
        group_norm_columns_f32(x.data(), partials.data(), weight.data(), bias.data(),
                               columns.data(), s.channels, channels_per_group, s.splits, s.eps,
                               s.silu, band->height, band->width, band->top, band->rows);
      } else {
        group_norm_columns_f16(x.data(), partials.data(), weight.data(), bias.data(),
                               columns.data(), s.channels, channels_per_group, s.splits, s.eps,
                               s.silu, band->height, band->width, band->top, band->rows);
      }
    });
    std::fwrite(columns.data(), sizeof(T), columns.size(), stdout);
    return;
  }
  std::vector<T> out(elements, from_float<T>(NAN));
  emulation::launch(dim3{s.blocks_per_plane, s.images * s.channels, 1}, threads, 0, [&] {
    if constexpr (std::is_same_v<T, float>) {
      group_norm_apply_f32(x.data(), partials.data(), weight.data(), bias.data(), out.data(),
                           s.channels, channels_per_group, s.plane_len, s.splits, s.eps,
                           s.silu);
    } else {
      group_norm_apply_f16(x.data(), partials.data(), weight.data(), bias.data(), out.data(),
                           s.channels, channels_per_group, s.plane_len, s.splits, s.eps,
                           s.silu);
    }
  });
  std::fwrite(out.data(), sizeof(T), out.size(), stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const bool affines = argc == 12 && std::string(argv[11]) == "affines";
  if (argc != 11 && argc != 16 && !affines) {
    std::fprintf(stderr,
                 "usage: group_norm_runner DTYPE IMAGES CHANNELS GROUPS PLANE_LEN SPLITS "
                 "SPLIT_LEN BLOCKS_PER_PLANE EPS SILU [HEIGHT WIDTH TOP ROWS BLOCKS | "
                 "affines]\n");
    return 2;
  }
  const auto arg = [&](int i) { return static_cast<uint32_t>(std::stoul(argv[i])); };
  const Settings settings{arg(2), arg(3), arg(4), arg(5),           arg(6),
                          arg(7), arg(8), std::stof(argv[9]), arg(10)};
  const Band band = argc == 16 ? Band{arg(11), arg(12), arg(13), arg(14), arg(15)} : Band{};
  const Band* columns = argc == 16 ? &band : nullptr;
  const std::string dtype = argv[1];
  if (dtype == "f32") {
    run<float>(settings, columns, affines);
  } else if (dtype == "f16") {
    run<__half>(settings, columns, affines);
  } else {
    std::fprintf(stderr, "group_norm_runner: DTYPE is f32 or f16, not %s\n", dtype.c_str());
    return 2;
  }
  return 0;
}
