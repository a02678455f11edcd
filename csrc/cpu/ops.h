// CPU implementations of the nanogpt_ext ops (registered in csrc/ext.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace nanogpt_cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd, bool has_bias);
at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& bias, bool tanh);
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double scale, double dropout_p,
                                                 const std::optional<at::Tensor>& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             bool causal, double scale, double dropout_p,
                                                             const std::optional<at::Tensor>& seed);
at::Tensor grad_norm(at::TensorList grads);
void adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList steps, const at::Tensor& lr, const at::Tensor& norm, double beta1, double beta2,
            double eps, double weight_decay, double max_grad_norm);

// the argument checks the CPU and CUDA adamw_ share (list lengths, each param's grad and state)
void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList steps, const at::Tensor& lr, const at::Tensor& norm, const char* op);

// debug aid: NANOGPT_POISON=1 fills outputs with NaN before the kernels write them
bool poison_outputs();
at::Tensor new_output(const at::Tensor& like_or_options_src, at::IntArrayRef sizes, at::ScalarType dtype);

const char* cpu_isa();

}  // namespace nanogpt_cpu
