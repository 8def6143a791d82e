// leancnn's two operators as C++ functions, for the translation units that call them directly
// (aoti_shims.cpp): leancnn::sparse_conv (psconv_kernel.cpp) and leancnn::virtual_upsample
// (virtual_upsample.cpp). Their schemas: the TORCH_LIBRARY blocks in those files.
#pragma once

#include <torch/extension.h>

namespace leancnn {

torch::Tensor sparse_conv(torch::Tensor input, torch::Tensor weights, torch::Tensor channels, torch::Tensor taps,
                          torch::Tensor chunk_slot, torch::Tensor chunk_group, torch::Tensor segment_pair,
                          torch::Tensor bias, torch::Tensor position, int64_t stride, bool relu,
                          const c10::optional<torch::Tensor>& residual, int64_t pass_blocks, bool serial);

torch::Tensor virtual_upsample(torch::Tensor values, int64_t height, int64_t width);

}  // namespace leancnn
