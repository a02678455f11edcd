// nanogpt._C: registers the nanogpt_ext::* custom ops (schemas + CPU kernels; CUDA kernels
// come from csrc/cuda/binding.cpp when built with NANOGPT_WITH_CUDA) and a tiny Python module
// with build information. The user-facing ops layer_norm, bias_gelu and attention (CPU) get their autograd
// formula here, in C++ (torch::autograd::Function registered for the Autograd key, which
// calls the *_fwd / *_bwd ops through the dispatcher): no Python on the per-call path.
// Fake (meta) kernels for torch.compile are registered in nanogpt/ext.py.
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(nanogpt_ext, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor");
  m.def("bias_gelu(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, float dropout_p, Tensor? seed) -> Tensor");
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool has_bias)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool tanh) -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, float dropout_p, Tensor? seed)"
        " -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale,"
        " float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def("grad_norm(Tensor[] grads) -> Tensor");
  m.def("adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
        " Tensor(d!)[] steps, Tensor lr, Tensor norm, float beta1, float beta2, float eps, float weight_decay,"
        " float max_grad_norm) -> ()");
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using LnOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<LnOut(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double)>&
ln_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nanogpt_ext::layer_norm_fwd", "")
                             .typed<LnOut(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          double)>();
  return op;
}
const c10::TypedOperatorHandle<LnOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, bool)>&
ln_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nanogpt_ext::layer_norm_bwd", "")
                             .typed<LnOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, bool)>();
  return op;
}
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, bool)>& bg_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nanogpt_ext::bias_gelu_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  return op;
}
const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const std::optional<at::Tensor>&, bool)>&
bg_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("nanogpt_ext::bias_gelu_bwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const std::optional<at::Tensor>&, bool)>();
  return op;
}

using OptT = std::optional<at::Tensor>;
using AttnFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                                   double, double, const OptT&);
using AttnBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const at::Tensor&, bool, double,
                                                               double, const OptT&);
const c10::TypedOperatorHandle<AttnFwd>& attn_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("nanogpt_ext::attention_fwd", "").typed<AttnFwd>();
  return op;
}
const c10::TypedOperatorHandle<AttnBwd>& attn_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("nanogpt_ext::attention_bwd", "").typed<AttnBwd>();
  return op;
}

struct LayerNormFn : public torch::autograd::Function<LayerNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = ln_fwd_op().call(x, weight, bias, eps);
    ctx->save_for_backward({x, weight, mean, rstd});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [dx, dw, db] = ln_bwd_op().call(grads[0], saved[0], saved[1], saved[2], saved[3], has_bias);
    return {dx, dw, has_bias ? db : at::Tensor(), at::Tensor()};
  }
};

struct BiasGeluFn : public torch::autograd::Function<BiasGeluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            bool tanh) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, has_bias ? *bias : at::Tensor()});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["tanh"] = tanh;
    return bg_fwd_op().call(x, bias, tanh);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    auto [dx, db] = bg_bwd_op().call(grads[0], saved[0], bias, ctx->saved_data["tanh"].toBool());
    return {dx, has_bias ? db : at::Tensor(), at::Tensor()};
  }
};

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            bool causal, double scale, double dropout_p, const OptT& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attn_fwd_op().call(q, k, v, causal, scale, dropout_p, seed);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;  // the backward regenerates the dropout mask from it
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto seed = ctx->saved_data["seed"].toOptional<at::Tensor>();
    auto [dq, dk, dv] = attn_bwd_op().call(grads[0], s[0], s[1], s[2], s[3], s[4],
                                           ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                                           ctx->saved_data["dropout_p"].toDouble(), seed);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor layer_norm_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               double eps) {
  return LayerNormFn::apply(x, weight, bias, eps);
}
at::Tensor bias_gelu_autograd(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  return BiasGeluFn::apply(x, bias, tanh);
}
at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                              double scale, double dropout_p, const OptT& seed) {
  return AttentionFn::apply(q, k, v, causal, scale, dropout_p, seed);
}
// below autograd (no grad needed, inference mode): just the forward kernels
at::Tensor layer_norm_plain(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            double eps) {
  return std::get<0>(ln_fwd_op().call(x, weight, bias, eps));
}
at::Tensor bias_gelu_plain(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  return bg_fwd_op().call(x, bias, tanh);
}
at::Tensor attention_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                           double dropout_p, const OptT& seed) {
  return std::get<0>(attn_fwd_op().call(q, k, v, causal, scale, dropout_p, seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(nanogpt_ext, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("bias_gelu", &bias_gelu_autograd);
  m.impl("attention", &attention_autograd);
}

#ifdef NANOGPT_WITH_CUDA
TORCH_LIBRARY_IMPL(nanogpt_ext, CUDA, m) {
  m.impl("layer_norm", &layer_norm_plain);
  m.impl("bias_gelu", &bias_gelu_plain);
}
#endif

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("layer_norm", &layer_norm_plain);
  m.impl("bias_gelu", &bias_gelu_plain);
  m.impl("layer_norm_fwd", &nanogpt_cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &nanogpt_cpu::layer_norm_bwd);
  m.impl("bias_gelu_fwd", &nanogpt_cpu::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &nanogpt_cpu::bias_gelu_bwd);
  m.impl("attention", &attention_plain);
  m.impl("attention_fwd", &nanogpt_cpu::attention_fwd);
  m.impl("attention_bwd", &nanogpt_cpu::attention_bwd);
  m.impl("grad_norm", &nanogpt_cpu::grad_norm);
  m.impl("adamw_", &nanogpt_cpu::adamw_);
}

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef NANOGPT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(nanogpt_cpu::cpu_isa()); }

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "Which ISA clone of the CPU kernels runs on this machine."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "nanogpt's C++/CUDA kernels; the ops are torch.ops.nanogpt_ext.*", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
