// y = act(x + bias) over the last dimension for the MLP activations: nanogpt_ext::bias_gelu (exact erf and
// tanh GELU) and nanogpt_ext::bias_relu2 (relu(x + bias)^2), one set of kernels for both. The backward gives
// dx = dy * act'(x + bias) and dbias = column sums of dx (fixed row chunks -> fp32 partials -> ordered sum, so
// deterministic). x in {fp32, bf16}; bias in {x's dtype, fp32}; fp32 math. Each op is a C++ autograd function
// over its _fwd / _bwd ops (on CPU a GELU's over bias_gelu_fwd_saving / bias_act_bwd_saved: see BiasActFn);
// registers the CPU kernels (leaf loops in cpu/bias_act_kernels.h) and, built with CUDA, the CUDA ones
// (cuda/bias_act.cu).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "cpu/glue.h"
#ifdef NANOGPT_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace nanogpt_cpu {
enum BiasAct : int { kGeluErf = 0, kGeluTanh = 1, kRelu2 = 2 };  // the kernels' ACT
}  // namespace nanogpt_cpu
#define NG_KERNELS "bias_act_kernels.h"
#include "cpu/isa_clones.h"

namespace nanogpt_cpu {
namespace {

struct Args {
  at::Tensor xc, bc;  // contiguous x, bias (undefined without one)
  int64_t M, N;
  at::ScalarType bias_dtype;  // x's dtype without a bias
};

Args prepare(const at::Tensor& x, const std::optional<at::Tensor>& bias, const char* op) {
  check_cpu(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension");
  Args a;
  a.N = x.size(-1);
  a.M = a.N > 0 ? x.numel() / a.N : 0;
  a.bias_dtype = x.scalar_type();
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == a.N, op, ": bias must have shape [", a.N, "], got ",
                bias->sizes());
    a.bc = bias->contiguous();
    a.bias_dtype = bias->scalar_type();
  }
  a.xc = x.contiguous();
  return a;
}

template <class B>
const B* bias_ptr(const Args& a) {
  return a.bc.defined() ? data<B>(a.bc) : nullptr;
}

// y = act(x + bias); with save_grad (GELU) also d = act'(x + bias) in fp32, for act_bwd_saved
std::tuple<at::Tensor, at::Tensor> act_fwd_impl(const at::Tensor& x, const std::optional<at::Tensor>& bias, int act,
                                                const char* op, bool save_grad) {
  const Args a = prepare(x, bias, op);
  at::Tensor y = new_output(x, x.sizes(), x.scalar_type());
  at::Tensor d = save_grad ? new_output(x, x.sizes(), at::kFloat) : at::Tensor();
  const int64_t N = a.N;
  with_row_dtypes(x.scalar_type(), a.bias_dtype, op, "bias", [&](auto t, auto b) {
    using T = decltype(t);
    using B = decltype(b);
    if (N == 0) return;
    const auto fwd = NG_ISA_PICK(bact::fwd<T, B>);
    const auto fwd_saving = NG_ISA_PICK(bact::fwd_saving<T, B>);
    at::parallel_for(0, a.M, std::max<int64_t>(1, 8192 / N), [&](int64_t r0, int64_t r1) {
      if (save_grad) fwd_saving(data<T>(a.xc), bias_ptr<B>(a), data<T>(y), data<float>(d), r0, r1, N, act);
      else fwd(data<T>(a.xc), bias_ptr<B>(a), data<T>(y), r0, r1, N, act);
    });
  });
  return {y, d};
}

at::Tensor act_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, int act, const char* op) {
  return std::get<0>(act_fwd_impl(x, bias, act, op, false));
}

// dx (dy's dtype) chunk by chunk of rows, then dbias (with a bias) as the ordered sum of the chunks' column sums of
// dx: deterministic. rows(T{}, B{}, dx, r0, r1, part) writes dx's rows [r0, r1) (dx: T*) and, with a bias, their
// column sums in part[N]. a: the bias (and shape) as prepared.
template <class Rows>
std::tuple<at::Tensor, at::Tensor> bwd_chunks(const at::Tensor& dy, const Args& a, const char* op, Rows&& rows) {
  const int64_t M = a.M, N = a.N;
  const bool has_bias = a.bc.defined();
  at::Tensor dx = new_output(dy, dy.sizes(), dy.scalar_type());
  at::Tensor db = new_output(dy, {has_bias ? N : 0}, a.bias_dtype);
  const int64_t chunk = reduce_chunk_rows(M);
  const int64_t nchunks = (M + chunk - 1) / chunk;
  const int64_t nc = std::max<int64_t>(nchunks, 1);
  at::Tensor part = at::empty({has_bias ? nc : 0, N}, dy.options().dtype(at::kFloat));
  if (has_bias && nchunks == 0) part.zero_();
  float* pp = has_bias ? part.data_ptr<float>() : nullptr;
  with_row_dtypes(dy.scalar_type(), a.bias_dtype, op, "bias", [&](auto t, auto b) {
    using T = decltype(t);
    using B = decltype(b);
    if (N == 0) return;
    at::parallel_for(0, nchunks, std::max<int64_t>(1, 8192 / (chunk * N)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * chunk, r1 = std::min(M, r0 + chunk);
        rows(T{}, B{}, data<T>(dx), r0, r1, pp ? pp + c * N : nullptr);
      }
    });
    if (!has_bias) return;
    const auto sum = NG_ISA_PICK(sum_chunks<B>);
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / nc),
                     [&](int64_t j0, int64_t j1) { sum(pp, nc, N, data<B>(db), j0, j1); });
  });
  return {dx, db};
}

std::tuple<at::Tensor, at::Tensor> act_bwd(const at::Tensor& dy, const at::Tensor& x,
                                           const std::optional<at::Tensor>& bias, int act, const char* op) {
  const Args a = prepare(x, bias, op);
  check_cpu(dy, op, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op, ": dy (", dy.sizes(), ", ",
              dy.scalar_type(), ") must match x (", x.sizes(), ", ", x.scalar_type(), ")");
  const at::Tensor dyc = dy.contiguous();
  return bwd_chunks(dyc, a, op, [&](auto t, auto b, auto* dx, int64_t r0, int64_t r1, float* part) {
    using T = decltype(t);
    using B = decltype(b);
    NG_ISA_PICK(bact::bwd<T, B>)(data<T>(dyc), data<T>(a.xc), bias_ptr<B>(a), dx, part, r0, r1, a.N, act);
  });
}

// the backward from the forward's saved d = act'(x + bias) (fp32, x's shape): dx = dy * d, dbias as act_bwd's;
// bias only says whether there is one and its dtype
std::tuple<at::Tensor, at::Tensor> act_bwd_saved(const at::Tensor& dy, const at::Tensor& d,
                                                 const std::optional<at::Tensor>& bias, const char* op) {
  const Args a = prepare(dy, bias, op);
  check_cpu(d, op, "d");
  TORCH_CHECK(d.sizes() == dy.sizes() && d.scalar_type() == at::kFloat, op, ": d (", d.sizes(), ", ",
              d.scalar_type(), ") must be float32 of dy's shape ", dy.sizes());
  const at::Tensor dc = d.contiguous();
  const at::Tensor& dyc = a.xc;  // prepare() took dy as its x: checked, made contiguous
  return bwd_chunks(dyc, a, op, [&](auto t, auto, auto* dx, int64_t r0, int64_t r1, float* part) {
    using T = decltype(t);
    NG_ISA_PICK(bact::bwd_saved<T>)(data<T>(dyc), data<float>(dc), dx, part, r0, r1, a.N);
  });
}

using Bias = std::optional<at::Tensor>;
at::Tensor bias_gelu_fwd(const at::Tensor& x, const Bias& bias, bool tanh) {
  return act_fwd(x, bias, tanh ? kGeluTanh : kGeluErf, "nanogpt_ext::bias_gelu_fwd");
}
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x, const Bias& bias,
                                                 bool tanh) {
  return act_bwd(dy, x, bias, tanh ? kGeluTanh : kGeluErf, "nanogpt_ext::bias_gelu_bwd");
}
at::Tensor bias_relu2_fwd(const at::Tensor& x, const Bias& bias) {
  return act_fwd(x, bias, kRelu2, "nanogpt_ext::bias_relu2_fwd");
}
std::tuple<at::Tensor, at::Tensor> bias_relu2_bwd(const at::Tensor& dy, const at::Tensor& x, const Bias& bias) {
  return act_bwd(dy, x, bias, kRelu2, "nanogpt_ext::bias_relu2_bwd");
}
std::tuple<at::Tensor, at::Tensor> bias_gelu_fwd_saving(const at::Tensor& x, const Bias& bias, bool tanh) {
  return act_fwd_impl(x, bias, tanh ? kGeluTanh : kGeluErf, "nanogpt_ext::bias_gelu_fwd_saving", true);
}
std::tuple<at::Tensor, at::Tensor> bias_act_bwd_saved(const at::Tensor& dy, const at::Tensor& d, const Bias& bias) {
  return act_bwd_saved(dy, d, bias, "nanogpt_ext::bias_act_bwd_saved");
}

// the _fwd / _bwd ops of `act` through the dispatcher (so each device's kernels run)
at::Tensor dispatch_fwd(const at::Tensor& x, const Bias& bias, int act) {
  static const auto gelu = ext_op<decltype(bias_gelu_fwd)>("bias_gelu_fwd");
  static const auto relu2 = ext_op<decltype(bias_relu2_fwd)>("bias_relu2_fwd");
  return act == kRelu2 ? relu2.call(x, bias) : gelu.call(x, bias, act == kGeluTanh);
}
std::tuple<at::Tensor, at::Tensor> dispatch_bwd(const at::Tensor& dy, const at::Tensor& x, const Bias& bias,
                                                int act) {
  static const auto gelu = ext_op<decltype(bias_gelu_bwd)>("bias_gelu_bwd");
  static const auto relu2 = ext_op<decltype(bias_relu2_bwd)>("bias_relu2_bwd");
  return act == kRelu2 ? relu2.call(dy, x, bias) : gelu.call(dy, x, bias, act == kGeluTanh);
}

// On CPU a GELU saves its derivative (fp32) instead of its input: the backward is then one multiply, not a
// second erf/tanh and exp per element (the same dx and dbias values); ReLU^2 and the CUDA kernels save x.
struct BiasActFn : public torch::autograd::Function<BiasActFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const Bias& bias,
                            int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_bias = bias.has_value() && bias->defined();
    const bool save_grad = x.device().is_cpu() && act != kRelu2;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["act"] = act;
    ctx->saved_data["save_grad"] = save_grad;
    if (save_grad) {
      static const auto op = ext_op<decltype(bias_gelu_fwd_saving)>("bias_gelu_fwd_saving");
      auto [y, d] = op.call(x, bias, act == kGeluTanh);
      ctx->save_for_backward({d, has_bias ? *bias : at::Tensor()});
      return y;
    }
    ctx->save_for_backward({x, has_bias ? *bias : at::Tensor()});
    return dispatch_fwd(x, bias, static_cast<int>(act));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Bias bias = has_bias ? Bias(saved[1]) : std::nullopt;
    at::Tensor dx, db;
    if (ctx->saved_data["save_grad"].toBool()) {
      static const auto op = ext_op<decltype(bias_act_bwd_saved)>("bias_act_bwd_saved");
      std::tie(dx, db) = op.call(grads[0], saved[0], bias);
    } else {
      std::tie(dx, db) = dispatch_bwd(grads[0], saved[0], bias, static_cast<int>(ctx->saved_data["act"].toInt()));
    }
    return {dx, has_bias ? db : at::Tensor(), at::Tensor()};
  }
};

at::Tensor bias_gelu_autograd(const at::Tensor& x, const Bias& bias, bool tanh) {
  const int act = tanh ? kGeluTanh : kGeluErf;
  const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || bias_grad)) {  // no graph (no_grad, evaluation): no
    at::AutoDispatchBelowADInplaceOrView guard;                               // derivative to save
    return dispatch_fwd(x, bias, act);
  }
  return BiasActFn::apply(x, bias, act);
}
at::Tensor bias_relu2_autograd(const at::Tensor& x, const Bias& bias) { return BiasActFn::apply(x, bias, kRelu2); }
// below autograd (no grad needed, inference mode): just the forward kernel, on any device
at::Tensor bias_gelu_plain(const at::Tensor& x, const Bias& bias, bool tanh) {
  return dispatch_fwd(x, bias, tanh ? kGeluTanh : kGeluErf);
}
at::Tensor bias_relu2_plain(const at::Tensor& x, const Bias& bias) { return dispatch_fwd(x, bias, kRelu2); }

}  // namespace
}  // namespace nanogpt_cpu

TORCH_LIBRARY_FRAGMENT(nanogpt_ext, m) {
  m.def("bias_gelu(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool tanh) -> (Tensor, Tensor)");
  m.def("bias_relu2(Tensor x, Tensor? bias) -> Tensor");
  m.def("bias_relu2_fwd(Tensor x, Tensor? bias) -> Tensor");
  m.def("bias_relu2_bwd(Tensor dy, Tensor x, Tensor? bias) -> (Tensor, Tensor)");
  m.def("bias_gelu_fwd_saving(Tensor x, Tensor? bias, bool tanh) -> (Tensor, Tensor)");
  m.def("bias_act_bwd_saved(Tensor dy, Tensor d, Tensor? bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, Autograd, m) {
  m.impl("bias_gelu", &nanogpt_cpu::bias_gelu_autograd);
  m.impl("bias_relu2", &nanogpt_cpu::bias_relu2_autograd);
}

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("bias_gelu", &nanogpt_cpu::bias_gelu_plain);
  m.impl("bias_gelu_fwd", &nanogpt_cpu::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &nanogpt_cpu::bias_gelu_bwd);
  m.impl("bias_relu2", &nanogpt_cpu::bias_relu2_plain);
  m.impl("bias_relu2_fwd", &nanogpt_cpu::bias_relu2_fwd);
  m.impl("bias_relu2_bwd", &nanogpt_cpu::bias_relu2_bwd);
  m.impl("bias_gelu_fwd_saving", &nanogpt_cpu::bias_gelu_fwd_saving);
  m.impl("bias_act_bwd_saved", &nanogpt_cpu::bias_act_bwd_saved);
}

#ifdef NANOGPT_WITH_CUDA
namespace nanogpt_cuda {
namespace {

using nanogpt_cpu::Bias;

at::Tensor act_fwd(const at::Tensor& x, const Bias& bias, int act, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, op, ": x must be a CUDA tensor with at least 1 dimension");
  const int64_t N = x.size(-1), M = rows_of(x);
  const bool has_bias = check_bias(x, bias, N, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = nanogpt_cpu::new_output(x, x.sizes(), x.scalar_type());
  if (N == 0 || M == 0) return y;
  const int xd = dtype_code(x.scalar_type(), op, "x");
  check_launch(ng_bias_act_fwd(xc.data_ptr(), has_bias ? bc.data_ptr() : nullptr, y.data_ptr(), M, N, act, xd,
                               has_bias ? dtype_code(bias->scalar_type(), op, "bias") : xd,
                               c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> act_bwd(const at::Tensor& dy, const at::Tensor& x, const Bias& bias, int act,
                                           const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, op, ": x must be a CUDA tensor with at least 1 dimension");
  const int64_t N = x.size(-1), M = rows_of(x);
  check_on(dy, x.device(), op, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op, ": dy (", dy.sizes(), ", ",
              dy.scalar_type(), ") must match x (", x.sizes(), ", ", x.scalar_type(), ")");
  const bool has_bias = check_bias(x, bias, N, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor dx = nanogpt_cpu::new_output(x, x.sizes(), x.scalar_type());
  at::Tensor db = nanogpt_cpu::new_output(x, {has_bias ? N : 0}, has_bias ? bias->scalar_type() : x.scalar_type());
  if (N == 0) return {dx, db};
  at::Tensor ws = at::empty({has_bias ? ng_colsum_chunks(M) * N : 0}, x.options().dtype(at::kFloat));
  const int xd = dtype_code(x.scalar_type(), op, "x");
  check_launch(ng_bias_act_bwd(dyc.data_ptr(), xc.data_ptr(), has_bias ? bc.data_ptr() : nullptr, dx.data_ptr(),
                               has_bias ? db.data_ptr() : nullptr, has_bias ? ws.data_ptr<float>() : nullptr, M, N,
                               act, xd, has_bias ? dtype_code(bias->scalar_type(), op, "bias") : xd,
                               c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, db};
}

// the CUDA entry points, as the CPU ones above: each op's schema over this namespace's act_fwd/act_bwd
using nanogpt_cpu::kGeluErf, nanogpt_cpu::kGeluTanh, nanogpt_cpu::kRelu2;
at::Tensor bias_gelu_fwd(const at::Tensor& x, const Bias& bias, bool tanh) {
  return act_fwd(x, bias, tanh ? kGeluTanh : kGeluErf, "nanogpt_ext::bias_gelu_fwd");
}
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x, const Bias& bias,
                                                 bool tanh) {
  return act_bwd(dy, x, bias, tanh ? kGeluTanh : kGeluErf, "nanogpt_ext::bias_gelu_bwd");
}
at::Tensor bias_relu2_fwd(const at::Tensor& x, const Bias& bias) {
  return act_fwd(x, bias, kRelu2, "nanogpt_ext::bias_relu2_fwd");
}
std::tuple<at::Tensor, at::Tensor> bias_relu2_bwd(const at::Tensor& dy, const at::Tensor& x, const Bias& bias) {
  return act_bwd(dy, x, bias, kRelu2, "nanogpt_ext::bias_relu2_bwd");
}

}  // namespace
}  // namespace nanogpt_cuda

TORCH_LIBRARY_IMPL(nanogpt_ext, CUDA, m) {
  m.impl("bias_gelu", &nanogpt_cpu::bias_gelu_plain);
  m.impl("bias_gelu_fwd", &nanogpt_cuda::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &nanogpt_cuda::bias_gelu_bwd);
  m.impl("bias_relu2", &nanogpt_cpu::bias_relu2_plain);
  m.impl("bias_relu2_fwd", &nanogpt_cuda::bias_relu2_fwd);
  m.impl("bias_relu2_bwd", &nanogpt_cuda::bias_relu2_bwd);
}
#endif
