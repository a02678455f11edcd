// Torch-side helpers shared by the ops' CPU and CUDA glue (csrc/<op>.cpp); defined in csrc/ext_common.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace nanogpt_cpu {

// debug aid: NANOGPT_POISON=1 fills outputs with NaN before the kernels write them
bool poison_outputs();
at::Tensor new_output(const at::Tensor& like_or_options_src, at::IntArrayRef sizes, at::ScalarType dtype);

// the argument checks the CPU and CUDA adamw_ share (list lengths, each param's grad and state)
void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList steps, const at::Tensor& lr, const at::Tensor& norm, const char* op);

}  // namespace nanogpt_cpu
