// C shims of leancnn's operators for AOTInductor packages (leancnn export --format pt2): the
// compiled program calls these directly instead of through its proxy executor, which boxes every
// argument of every call (about 2 us a call; resnet20 w0.5 PS4_P4's package ran 1.35x the deployed
// model at batch 1 with it, AMD EPYC Zen 5). The names and argument conventions are AOTInductor's
// (aoti_torch_<device>_<operator>: tensors as handles, an optional tensor as a pointer to a handle,
// bools as int32, the result through the last pointer); SHIM_DECLARATIONS in leancnn/export.py
// declares the same signatures to its code generator. The symbols must be visible to the package's
// library when it loads: the kernel library is loaded with RTLD_GLOBAL (leancnn.kernels:
// expose_operator_shims, and the model card's loading line).
#include "kernel_ops.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

namespace {

const at::Tensor& tensor(AtenTensorHandle handle) {
  return *torch::aot_inductor::tensor_handle_to_tensor_pointer(handle);
}

}  // namespace

extern "C" {

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_sparse_conv(
    AtenTensorHandle input, AtenTensorHandle weights, AtenTensorHandle channels, AtenTensorHandle taps,
    AtenTensorHandle chunk_slot, AtenTensorHandle chunk_group, AtenTensorHandle segment_pair, AtenTensorHandle bias,
    AtenTensorHandle position, int64_t stride, int32_t relu, AtenTensorHandle* residual, int64_t pass_blocks,
    int32_t serial, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    c10::optional<torch::Tensor> added;
    if (residual != nullptr) added = tensor(*residual);
    *ret0 = torch::aot_inductor::new_tensor_handle(
        leancnn::sparse_conv(tensor(input), tensor(weights), tensor(channels), tensor(taps), tensor(chunk_slot),
                             tensor(chunk_group), tensor(segment_pair), tensor(bias), tensor(position), stride,
                             relu != 0, added, pass_blocks, serial != 0));
  });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_virtual_upsample(AtenTensorHandle values, int64_t height,
                                                                 int64_t width, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(leancnn::virtual_upsample(tensor(values), height, width));
  });
}

}  // extern "C"
