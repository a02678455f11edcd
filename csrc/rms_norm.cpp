// RMSNorm over the last dimension, CPU: forward saves the fp32 rstd = 1 / sqrt(mean(x^2) + eps); backward
// gives dx and, with a weight, dweight reduced deterministically (fixed row chunks -> fp32 partial sums ->
// ordered sum over chunks). Dtypes: x in {fp32, bf16}; weight (optional) in {x's dtype, fp32}; fp32 math; y (and
// so dy) in out_dtype, default x's, written directly or cast as layer_norm.cpp says.
// Defines nanogpt_ext::rms_norm (C++ autograd over rms_norm_fwd / rms_norm_bwd) and registers the CPU kernels
// (leaf loops in cpu/rms_norm_kernels.h) and, built with CUDA, the CUDA ones (cuda/rms_norm.cu).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "cpu/glue.h"
#ifdef NANOGPT_WITH_CUDA
#include "cuda/glue.h"
#endif
#define NG_KERNELS "rms_norm_kernels.h"
#include "cpu/isa_clones.h"

namespace nanogpt_cpu {
namespace {

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// the weight's dtype, or x's without a weight (the kernels then never read it)
at::ScalarType check_weight(const at::Tensor& x, const std::optional<at::Tensor>& weight, const char* op) {
  if (!has(weight)) return x.scalar_type();
  check_cpu(*weight, op, "weight");
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(-1), op, ": weight must have shape [", x.size(-1),
              "], got ", weight->sizes());
  return weight->scalar_type();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps, std::optional<at::ScalarType> out_dtype) {
  const char* op = "nanogpt_ext::rms_norm_fwd";
  check_cpu(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension");
  const at::ScalarType wt = check_weight(x, weight, op);
  const int64_t N = x.size(-1), M = x.numel() / N;
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = has(weight) ? weight->contiguous() : at::Tensor();
  const at::ScalarType out = out_dtype.value_or(x.scalar_type());
  at::Tensor y;
  at::Tensor rstd = new_output(x, {M}, at::kFloat);
  float* rp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  with_row_dtypes(x.scalar_type(), wt, op, "weight", [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    const auto run = [&](auto yt, at::ScalarType y_dtype) {
      using Y = decltype(yt);
      y = new_output(x, x.sizes(), y_dtype);
      const auto fwd = NG_ISA_PICK(rn::fwd<T, W, Y>);
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
        fwd(data<T>(xc), wc.defined() ? data<W>(wc) : nullptr, data<Y>(y), rp, r0, r1, N, e);
      });
    };
    if (!with_out_type<T>(out, [&](auto yt) { run(yt, out); })) {
      run(T{}, x.scalar_type());
      y = y.to(out);
    }
  });
  return {y, rstd};
}

// dy in y's dtype (any, as the forward's out_dtype); dx in x's
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  const char* op = "nanogpt_ext::rms_norm_bwd";
  for (auto* t : {&dy_, &x, &rstd}) check_cpu(*t, op, "every argument");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension");
  TORCH_CHECK(dy_.sizes() == x.sizes(), op, ": dy shape ", dy_.sizes(), " differs from x shape ", x.sizes());
  const at::ScalarType wt = check_weight(x, weight, op);
  const int64_t N = x.size(-1), M = x.numel() / N;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == M, op, ": rstd must be float32 with ", M,
              " elements");
  const at::Tensor xc = x.contiguous(), rc = rstd.contiguous();
  const at::Tensor wc = has(weight) ? weight->contiguous() : at::Tensor();
  at::Tensor dx = new_output(x, x.sizes(), x.scalar_type());
  at::Tensor dw = new_output(x, {wc.defined() ? N : 0}, wt);
  const int64_t chunk = reduce_chunk_rows(M);
  const int64_t nchunks = (M + chunk - 1) / chunk;
  const int64_t nc = std::max<int64_t>(nchunks, 1);
  at::Tensor part = at::empty({wc.defined() ? nc : 0, N}, x.options().dtype(at::kFloat));
  if (wc.defined() && nchunks == 0) part.zero_();
  float* pp = wc.defined() ? part.data_ptr<float>() : nullptr;
  with_row_dtypes(x.scalar_type(), wt, op, "weight", [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    const W* wp = wc.defined() ? data<W>(wc) : nullptr;
    at::Tensor dy = dy_.contiguous();
    const auto run = [&](auto yt) {
      using Y = decltype(yt);
      const auto bwd = NG_ISA_PICK(rn::bwd<T, W, Y>);
      at::parallel_for(0, nchunks, std::max<int64_t>(1, 16384 / (chunk * N)), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * chunk, r1 = std::min(M, r0 + chunk);
          bwd(data<Y>(dy), data<T>(xc), wp, rc.data_ptr<float>(), data<T>(dx), pp ? pp + c * N : nullptr, r0, r1,
              N);
        }
      });
    };
    if (!with_out_type<T>(dy.scalar_type(), run)) {
      dy = dy.to(x.scalar_type());
      run(T{});
    }
    if (!wc.defined()) return;
    const auto sum = NG_ISA_PICK(sum_chunks<W>);
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / nc),
                     [&](int64_t j0, int64_t j1) { sum(pp, nc, N, data<W>(dw), j0, j1); });
  });
  return {dx, dw};
}

const c10::TypedOperatorHandle<decltype(rms_norm_fwd)>& fwd_op() {
  static const auto op = ext_op<decltype(rms_norm_fwd)>("rms_norm_fwd");
  return op;
}

struct RmsNormFn : public torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight, double eps,
                            std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, rstd] = fwd_op().call(x, weight, eps, out_dtype);
    ctx->save_for_backward({x, has(weight) ? *weight : at::Tensor(), rstd});
    ctx->saved_data["has_weight"] = has(weight);
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto bwd_op = ext_op<decltype(rms_norm_bwd)>("rms_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const std::optional<at::Tensor> weight = has_weight ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    auto [dx, dw] = bwd_op.call(grads[0], saved[0], weight, saved[2]);
    return {dx, has_weight ? dw : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps,
                             std::optional<at::ScalarType> out_dtype) {
  return RmsNormFn::apply(x, weight, eps, out_dtype);
}
// below autograd (no grad needed, inference mode): just the forward kernel, on any device
at::Tensor rms_norm_plain(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps,
                          std::optional<at::ScalarType> out_dtype) {
  return std::get<0>(fwd_op().call(x, weight, eps, out_dtype));
}

}  // namespace
}  // namespace nanogpt_cpu

TORCH_LIBRARY_FRAGMENT(nanogpt_ext, m) {
  m.def("rms_norm(Tensor x, Tensor? weight, float eps, ScalarType? out_dtype=None) -> Tensor");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps, ScalarType? out_dtype=None) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, Autograd, m) { m.impl("rms_norm", &nanogpt_cpu::rms_norm_autograd); }

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("rms_norm", &nanogpt_cpu::rms_norm_plain);
  m.impl("rms_norm_fwd", &nanogpt_cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &nanogpt_cpu::rms_norm_bwd);
}

#ifdef NANOGPT_WITH_CUDA
namespace nanogpt_cuda {
namespace {

// the weight's dtype code, or x's without a weight
int check_weight(const at::Tensor& x, const std::optional<at::Tensor>& weight, const char* op) {
  if (!weight.has_value() || !weight->defined()) return dtype_code(x.scalar_type(), op, "x");
  check_on(*weight, x.device(), op, "weight");
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(-1), op, ": weight must have shape [", x.size(-1),
              "], got ", weight->sizes());
  check_param_dtype(x, *weight, op, "weight");
  return dtype_code(weight->scalar_type(), op, "weight");
}

// y in out_dtype by a cast after the kernel (the CUDA kernels write x's dtype)
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps, std::optional<at::ScalarType> out_dtype) {
  const char* op = "nanogpt_ext::rms_norm_fwd";
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension");
  const int wd = check_weight(x, weight, op);
  const int64_t N = x.size(-1), M = rows_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  at::Tensor y = nanogpt_cpu::new_output(x, x.sizes(), x.scalar_type());
  at::Tensor rstd = nanogpt_cpu::new_output(x, {M}, at::kFloat);
  check_launch(ng_rms_norm_fwd(xc.data_ptr(), wc.defined() ? wc.data_ptr() : nullptr, y.data_ptr(),
                               rstd.data_ptr<float>(), M, N, static_cast<float>(eps),
                               dtype_code(x.scalar_type(), op, "x"), wd, c10::cuda::getCurrentCUDAStream()),
               op);
  return {out_dtype && *out_dtype != y.scalar_type() ? y.to(*out_dtype) : y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  const char* op = "nanogpt_ext::rms_norm_bwd";
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1 && x.size(-1) > 0, op, ": x must be a CUDA tensor with a non-empty last dim");
  const int64_t N = x.size(-1), M = rows_of(x);
  for (auto* t : {&dy_, &rstd}) check_on(*t, x.device(), op, "every argument");
  TORCH_CHECK(dy_.sizes() == x.sizes(), op, ": dy shape ", dy_.sizes(), " differs from x shape ", x.sizes());
  const at::Tensor dy = dy_.to(x.scalar_type());  // y's dtype (the forward's out_dtype): x's for the kernels
  const int wd = check_weight(x, weight, op);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == M, op, ": rstd must be float32 with ", M,
              " elements");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), rc = rstd.contiguous();
  const at::Tensor wc = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  at::Tensor dx = nanogpt_cpu::new_output(x, x.sizes(), x.scalar_type());
  at::Tensor dw = nanogpt_cpu::new_output(x, {wc.defined() ? N : 0}, wc.defined() ? wc.scalar_type() : x.scalar_type());
  at::Tensor ws = at::empty({wc.defined() ? ng_colsum_chunks(M) * N : 0}, x.options().dtype(at::kFloat));
  check_launch(ng_rms_norm_bwd(dyc.data_ptr(), xc.data_ptr(), wc.defined() ? wc.data_ptr() : nullptr,
                               rc.data_ptr<float>(), dx.data_ptr(), wc.defined() ? dw.data_ptr() : nullptr,
                               wc.defined() ? ws.data_ptr<float>() : nullptr, M, N,
                               dtype_code(x.scalar_type(), op, "x"), wd, c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, dw};
}

}  // namespace
}  // namespace nanogpt_cuda

TORCH_LIBRARY_IMPL(nanogpt_ext, CUDA, m) {
  m.impl("rms_norm", &nanogpt_cpu::rms_norm_plain);
  m.impl("rms_norm_fwd", &nanogpt_cuda::rms_norm_fwd);
  m.impl("rms_norm_bwd", &nanogpt_cuda::rms_norm_bwd);
}
#endif
