// ViP's interpolation back to full size (leancnn/layers/vip.py: the rule) as one pass over a
// channels_last output: output row y is input row y / 2 (y even) or the mean of rows y / 2 and
// y / 2 + 1 (y odd; the last odd row of an even height copies its one neighbour), and the same on
// columns. The reference path is F.interpolate (bilinear, aligned corners) to (2h - 1) x (2w - 1)
// and a replicate pad to the even size: two passes and an intermediate tensor, in whatever memory
// format comes in. Here each output pixel's C channels are the mean of 1, 2 or 4 input pixels'
// contiguous channels, written once: at ViP's 28x28 and 32x32 maps the two passes cost as much as
// the stride-2 convolution saved (docs/deploy.md).
//
// The loops are plain C++ compiled for AVX-512, AVX2 and baseline x86-64 (GCC's target_clones,
// chosen at load time by the CPU), so no vector unit is assumed. Rows are split between ATen's
// threads; a small call stays in the calling thread.
#include "kernel_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace leancnn {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LEANCNN_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define LEANCNN_CLONES
#endif

// One output row from one (already vertically blended) input row of `w` pixels of `c` channels.
LEANCNN_CLONES
void widen_row(const float* __restrict row, int64_t w, int64_t width, int64_t c, float* __restrict out) {
  for (int64_t x = 0; x < width; ++x) {
    const float* left = row + (x / 2) * c;
    float* dst = out + x * c;
    if (x % 2 == 0 || x / 2 + 1 >= w) {  // a computed column, or the border's nearest one
      for (int64_t k = 0; k < c; ++k) dst[k] = left[k];
    } else {
      const float* right = left + c;
      for (int64_t k = 0; k < c; ++k) dst[k] = 0.5f * (left[k] + right[k]);
    }
  }
}

// The mean of two input rows (n floats each), for an odd output row.
LEANCNN_CLONES
void blend_rows(const float* __restrict top, const float* __restrict bottom, int64_t n, float* __restrict out) {
  for (int64_t k = 0; k < n; ++k) out[k] = 0.5f * (top[k] + bottom[k]);
}

// `images` maps of h x w pixels of c contiguous channels -> height x width, row by row.
void upsample(const float* in, int64_t images, int64_t h, int64_t w, int64_t c, int64_t height, int64_t width,
              float* out) {
  const int64_t in_row = w * c, out_row = width * c;
  // Rows per thread task: at least ~64K floats written, so a batch-1 map stays in one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(out_row, 1));
  at::parallel_for(0, images * height, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> blended(static_cast<size_t>(in_row));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t image = r / height, y = r % height;
      const float* row = in + (image * h + y / 2) * in_row;
      if (y % 2 == 1 && y / 2 + 1 < h) {
        blend_rows(row, row + in_row, in_row, blended.data());
        row = blended.data();
      }
      widen_row(row, w, width, c, out + r * out_row);
    }
  });
}
}  // namespace

torch::Tensor virtual_upsample(torch::Tensor values, int64_t height, int64_t width) {
  TORCH_CHECK(values.dim() == 4 && values.scalar_type() == torch::kFloat && values.device().is_cpu(),
              "virtual_upsample: values must be a 4-d float32 CPU tensor");
  const int64_t h = (height + 1) / 2, w = (width + 1) / 2;
  TORCH_CHECK(height >= 1 && width >= 1 && values.size(2) >= h && values.size(3) >= w,
              "virtual_upsample: ", values.size(2), "x", values.size(3), " computed values cannot fill ", height, "x",
              width);
  // The output keeps the values' memory format: channels_last runs each pixel's channels as one
  // vector; contiguous (NCHW) is the same loop over N x C one-channel maps.
  const bool last = values.is_contiguous(at::MemoryFormat::ChannelsLast) && !values.is_contiguous();
  const auto format = last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto x = values.narrow(2, 0, h).narrow(3, 0, w).contiguous(format);  // the computed values a map needs
  const int64_t n = x.size(0), c = x.size(1);
  auto out = torch::empty({n, c, height, width}, x.options().memory_format(format));
  if (out.numel() == 0) return out;
  if (last)
    upsample(x.data_ptr<float>(), n, h, w, c, height, width, out.data_ptr<float>());
  else
    upsample(x.data_ptr<float>(), n * c, h, w, 1, height, width, out.data_ptr<float>());
  return out;
}

}  // namespace leancnn

TORCH_LIBRARY_FRAGMENT(leancnn, m) {
  m.def("virtual_upsample(Tensor values, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(leancnn, CPU, m) { m.impl("virtual_upsample", &leancnn::virtual_upsample); }
