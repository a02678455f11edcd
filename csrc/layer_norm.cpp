// LayerNorm over the last dimension, CPU: forward saves fp32 mean/rstd; backward gives dx,
// dweight, dbias with dweight/dbias reduced deterministically (fixed row chunks -> fp32
// partial sums -> ordered sum over chunks). Dtypes: x in {fp32, bf16}; weight/bias in
// {x's dtype, fp32}; all math in fp32. y (and so dy) in out_dtype, default x's: under autocast the model
// asks for the dtype the next matmul casts to, which the CPU kernels write directly for an fp32 x (bf16); other
// pairs, and the CUDA kernels, compute in x's dtype and cast. Defines nanogpt_ext::layer_norm (C++ autograd over
// layer_norm_fwd / layer_norm_bwd) and nanogpt_ext::add_layer_norm (CPU only: x + add, then LayerNorm of it, in one
// pass; its backward also sums s's gradients and casts add's, where autograd ran ops of their own), and registers
// the CPU kernels (leaf loops in cpu/layer_norm_kernels.h) and, built with CUDA, the CUDA ones (cuda/layer_norm.cu).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "cpu/glue.h"
#ifdef NANOGPT_WITH_CUDA
#include "cuda/glue.h"
#endif
#define NG_KERNELS "layer_norm_kernels.h"
#include "cpu/isa_clones.h"

namespace nanogpt_cpu {
namespace {

using LnOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

void check_params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* op) {
  check_cpu(x, op, "x");
  check_cpu(weight, op, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension");
  const int64_t N = x.size(-1);
  TORCH_CHECK(N > 0, op, ": the normalized dimension is empty");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, op, ": weight must have shape [", N, "], got ",
              weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from weight dtype ", weight.scalar_type());
  }
}

// LayerNorm's forward over the rows of xc (contiguous, checked): y in out_dtype, fp32 mean and rstd. In each range
// of rows, pre(T{}, r0, r1) runs first: add_layer_norm writes those rows of xc there, so they are normalized from L1.
template <class Pre>
LnOut ln_forward(const at::Tensor& xc, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps,
                 std::optional<at::ScalarType> out_dtype, const char* op, Pre&& pre) {
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t N = xc.size(-1), M = xc.numel() / N;
  const at::ScalarType out = out_dtype.value_or(xc.scalar_type());
  at::Tensor y;
  at::Tensor mean = new_output(xc, {M}, at::kFloat), rstd = new_output(xc, {M}, at::kFloat);
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  with_row_dtypes(xc.scalar_type(), weight.scalar_type(), op, "weight", [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    const auto run = [&](auto yt, at::ScalarType y_dtype) {
      using Y = decltype(yt);
      y = new_output(xc, xc.sizes(), y_dtype);
      const auto fwd = NG_ISA_PICK(ln::fwd<T, W, Y>);
      at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
        pre(T{}, r0, r1);
        fwd(data<T>(xc), data<W>(wc), has_bias ? data<W>(bc) : nullptr, data<Y>(y), mp, rp, r0, r1, N, e);
      });
    };
    if (!with_out_type<T>(out, [&](auto yt) { run(yt, out); })) {  // a pair the kernels do not write: x's dtype,
      run(T{}, xc.scalar_type());                                      // then a cast
      y = y.to(out);
    }
  });
  return {y, mean, rstd};
}

LnOut layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps,
                     std::optional<at::ScalarType> out_dtype) {
  const char* op = "nanogpt_ext::layer_norm_fwd";
  check_params(x, weight, bias, op);
  return ln_forward(x.contiguous(), weight, bias, eps, out_dtype, op, [](auto, int64_t, int64_t) {});
}

// LayerNorm's backward over the rows of xc: dx in x's dtype from dy in y's dtype (any, as the forward's out_dtype),
// dweight and dbias reduced deterministically. After each chunk's rows, post(T{}, r0, r1) runs on them (dx hot).
template <class Post>
LnOut ln_backward(const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                  const at::Tensor& rstd, bool has_bias, const char* op, Post&& post) {
  for (auto* t : {&dy_, &x, &weight, &mean, &rstd}) check_cpu(*t, op, "every argument");
  const int64_t N = x.size(-1);
  TORCH_CHECK(dy_.sizes() == x.sizes(), op, ": dy shape ", dy_.sizes(), " differs from x shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, op, ": weight must have shape [", N, "]");
  const int64_t M = N > 0 ? x.numel() / N : 0;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == M &&
                  rstd.numel() == M,
              op, ": mean/rstd must be float32 with ", M, " elements");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = new_output(x, x.sizes(), x.scalar_type());
  at::Tensor dw = new_output(weight, {N}, weight.scalar_type());
  at::Tensor db = new_output(weight, {has_bias ? N : 0}, weight.scalar_type());

  const int64_t chunk = reduce_chunk_rows(M);
  const int64_t nchunks = (M + chunk - 1) / chunk;
  const int64_t nc = std::max<int64_t>(nchunks, 1);
  at::Tensor part = at::empty({2, nc, N}, x.options().dtype(at::kFloat));
  float* dwp = part[0].data_ptr<float>();
  float* dbp = part[1].data_ptr<float>();
  if (nchunks == 0) part.zero_();
  const int64_t grain = std::max<int64_t>(1, 16384 / (chunk * N));
  with_row_dtypes(x.scalar_type(), weight.scalar_type(), op, "weight", [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    at::Tensor dy = dy_.contiguous();
    const auto run = [&](auto yt) {
      using Y = decltype(yt);
      const auto bwd = NG_ISA_PICK(ln::bwd<T, W, Y>);
      at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * chunk, r1 = std::min(M, r0 + chunk);
          bwd(data<Y>(dy), data<T>(xc), data<W>(wc), mc.data_ptr<float>(), rc.data_ptr<float>(), data<T>(dx),
              dwp + c * N, dbp + c * N, r0, r1, N);
          post(T{}, dx, r0, r1);
        }
      });
    };
    if (!with_out_type<T>(dy.scalar_type(), run)) {  // as the forward: in x's dtype
      dy = dy.to(x.scalar_type());
      run(T{});
    }
    const auto sum = NG_ISA_PICK(sum_chunks<W>);
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / nc), [&](int64_t j0, int64_t j1) {
      sum(dwp, nc, N, data<W>(dw), j0, j1);
      if (has_bias) sum(dbp, nc, N, data<W>(db), j0, j1);
    });
  });
  return {dx, dw, db};
}

LnOut layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                     const at::Tensor& rstd, bool has_bias) {
  return ln_backward(dy, x, weight, mean, rstd, has_bias, "nanogpt_ext::layer_norm_bwd",
                     [](auto, const at::Tensor&, int64_t, int64_t) {});
}

// ---- add_layer_norm: s = x + add, then LayerNorm of s, in one pass over the rows (the block's residual add before
// ln_2). add is x's dtype or, for an fp32 x, bf16 (an autocast branch): s keeps x's dtype, as torch's x + add.

// f(R{}) with add's storage type
template <class T, class F>
void with_add_type(at::ScalarType add, F&& f) {
  if (add == at::kBFloat16) f(bf16_t{});
  else f(T{});
}

void check_add(const at::Tensor& x, at::ScalarType add, const char* op) {
  TORCH_CHECK(add == x.scalar_type() || (add == at::kBFloat16 && x.scalar_type() == at::kFloat), op,
              ": add must have x's dtype or be bfloat16 with a float32 x, got add ", add, " and x ",
              x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& add, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps, std::optional<at::ScalarType> out_dtype) {
  const char* op = "nanogpt_ext::add_layer_norm_fwd";
  check_params(x, weight, bias, op);
  check_cpu(add, op, "add");
  TORCH_CHECK(add.sizes() == x.sizes(), op, ": add shape ", add.sizes(), " differs from x shape ", x.sizes());
  check_add(x, add.scalar_type(), op);
  const at::Tensor xc = x.contiguous(), ac = add.contiguous();
  at::Tensor s = new_output(x, x.sizes(), x.scalar_type());
  const int64_t N = x.size(-1);
  auto [y, mean, rstd] = ln_forward(s, weight, bias, eps, out_dtype, op, [&](auto t, int64_t r0, int64_t r1) {
    using T = decltype(t);
    with_add_type<T>(ac.scalar_type(), [&](auto a) {
      using R = decltype(a);
      NG_ISA_PICK(ln::add_rows<T, R>)(data<T>(xc), data<R>(ac), data<T>(s), r0, r1, N);
    });
  });
  return {s, y, mean, rstd};
}

// (dx, dadd, dweight, dbias): dx = ds + LayerNorm's dx (ds undefined: s had no other use), dadd = dx in add's dtype
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& ds, const at::Tensor& s, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, at::ScalarType add_dtype) {
  const char* op = "nanogpt_ext::add_layer_norm_bwd";
  check_add(s, add_dtype, op);
  const bool has_ds = ds.has_value() && ds->defined();
  if (has_ds) {
    check_cpu(*ds, op, "ds");
    TORCH_CHECK(ds->sizes() == s.sizes() && ds->scalar_type() == s.scalar_type(), op, ": ds (", ds->sizes(), ", ",
                ds->scalar_type(), ") must match s (", s.sizes(), ", ", s.scalar_type(), ")");
  }
  const at::Tensor dsc = has_ds ? ds->contiguous() : at::Tensor();
  at::Tensor dadd = new_output(s, s.sizes(), add_dtype);
  const int64_t N = s.size(-1);
  auto [dx, dw, db] = ln_backward(dy, s, weight, mean, rstd, has_bias, op,
                                  [&](auto t, const at::Tensor& dxt, int64_t r0, int64_t r1) {
    using T = decltype(t);
    with_add_type<T>(add_dtype, [&](auto a) {
      using R = decltype(a);
      NG_ISA_PICK(ln::add_rows_bwd<T, R>)(data<T>(dxt), has_ds ? data<T>(dsc) : nullptr, data<R>(dadd), r0, r1, N);
    });
  });
  return {dx, dadd, dw, db};
}

const c10::TypedOperatorHandle<decltype(layer_norm_fwd)>& fwd_op() {
  static const auto op = ext_op<decltype(layer_norm_fwd)>("layer_norm_fwd");
  return op;
}

struct LayerNormFn : public torch::autograd::Function<LayerNormFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double eps,
                            std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = fwd_op().call(x, weight, bias, eps, out_dtype);
    ctx->save_for_backward({x, weight, mean, rstd});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto bwd_op = ext_op<decltype(layer_norm_bwd)>("layer_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [dx, dw, db] = bwd_op.call(grads[0], saved[0], saved[1], saved[2], saved[3], has_bias);
    return {dx, dw, has_bias ? db : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct AddLayerNormFn : public torch::autograd::Function<AddLayerNormFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& add, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, double eps,
                                                std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = ext_op<decltype(add_layer_norm_fwd)>("add_layer_norm_fwd");
    auto [s, y, mean, rstd] = op.call(x, add, weight, bias, eps, out_dtype);
    ctx->save_for_backward({s, weight, mean, rstd});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["add_dtype"] = add.scalar_type();
    return {s, y};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto bwd_op = ext_op<decltype(add_layer_norm_bwd)>("add_layer_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor& s = saved[0];
    // y unused: LayerNorm's part of the gradient is 0
    const at::Tensor dy = grads[1].defined() ? grads[1] : at::zeros_like(s);
    const std::optional<at::Tensor> ds = grads[0].defined() ? std::optional<at::Tensor>(grads[0]) : std::nullopt;
    auto [dx, dadd, dw, db] = bwd_op.call(dy, ds, s, saved[1], saved[2], saved[3], has_bias,
                                          ctx->saved_data["add_dtype"].toScalarType());
    return {dx, dadd, dw, has_bias ? db : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> add_layer_norm_autograd(const at::Tensor& x, const at::Tensor& add,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, double eps,
                                                           std::optional<at::ScalarType> out_dtype) {
  auto out = AddLayerNormFn::apply(x, add, weight, bias, eps, out_dtype);
  return {out[0], out[1]};
}
std::tuple<at::Tensor, at::Tensor> add_layer_norm_plain(const at::Tensor& x, const at::Tensor& add,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, double eps,
                                                        std::optional<at::ScalarType> out_dtype) {
  auto [s, y, mean, rstd] = add_layer_norm_fwd(x, add, weight, bias, eps, out_dtype);
  return {s, y};
}

at::Tensor layer_norm_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               double eps, std::optional<at::ScalarType> out_dtype) {
  return LayerNormFn::apply(x, weight, bias, eps, out_dtype);
}
// below autograd (no grad needed, inference mode): just the forward kernel, on any device
at::Tensor layer_norm_plain(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            double eps, std::optional<at::ScalarType> out_dtype) {
  return std::get<0>(fwd_op().call(x, weight, bias, eps, out_dtype));
}

}  // namespace
}  // namespace nanogpt_cpu

TORCH_LIBRARY_FRAGMENT(nanogpt_ext, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps, ScalarType? out_dtype=None) -> Tensor");
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps, ScalarType? out_dtype=None)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool has_bias)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("add_layer_norm(Tensor x, Tensor add, Tensor weight, Tensor? bias, float eps, ScalarType? out_dtype=None)"
        " -> (Tensor, Tensor)");
  m.def("add_layer_norm_fwd(Tensor x, Tensor add, Tensor weight, Tensor? bias, float eps, ScalarType? out_dtype=None)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor weight, Tensor mean, Tensor rstd, bool has_bias,"
        " ScalarType add_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, Autograd, m) {
  m.impl("layer_norm", &nanogpt_cpu::layer_norm_autograd);
  m.impl("add_layer_norm", &nanogpt_cpu::add_layer_norm_autograd);
}

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("layer_norm", &nanogpt_cpu::layer_norm_plain);
  m.impl("layer_norm_fwd", &nanogpt_cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &nanogpt_cpu::layer_norm_bwd);
  m.impl("add_layer_norm", &nanogpt_cpu::add_layer_norm_plain);
  m.impl("add_layer_norm_fwd", &nanogpt_cpu::add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &nanogpt_cpu::add_layer_norm_bwd);
}

#ifdef NANOGPT_WITH_CUDA
namespace nanogpt_cuda {
namespace {

// y in out_dtype by a cast after the kernel (the CUDA kernels write x's dtype)
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, double eps,
                                                              std::optional<at::ScalarType> out_dtype) {
  const char* op = "nanogpt_ext::layer_norm_fwd";
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension");
  const int64_t N = x.size(-1), M = rows_of(x);
  check_on(weight, x.device(), op, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, op, ": weight must have shape [", N, "], got ",
              weight.sizes());
  check_param_dtype(x, weight, op, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_on(*bias, x.device(), op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype differs from weight dtype");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = nanogpt_cpu::new_output(x, x.sizes(), x.scalar_type());
  at::Tensor mean = nanogpt_cpu::new_output(x, {M}, at::kFloat);
  at::Tensor rstd = nanogpt_cpu::new_output(x, {M}, at::kFloat);
  check_launch(ng_layer_norm_fwd(xc.data_ptr(), wc.data_ptr(), has_bias ? bc.data_ptr() : nullptr, y.data_ptr(),
                                 mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N, static_cast<float>(eps),
                                 dtype_code(x.scalar_type(), op, "x"), dtype_code(weight.scalar_type(), op, "weight"),
                                 c10::cuda::getCurrentCUDAStream()),
               op);
  return {out_dtype && *out_dtype != y.scalar_type() ? y.to(*out_dtype) : y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy_, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd, bool has_bias) {
  const char* op = "nanogpt_ext::layer_norm_bwd";
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1 && x.size(-1) > 0, op, ": x must be a CUDA tensor with a non-empty last dim");
  const int64_t N = x.size(-1), M = rows_of(x);
  for (auto* t : {&dy_, &weight, &mean, &rstd}) check_on(*t, x.device(), op, "every argument");
  TORCH_CHECK(dy_.sizes() == x.sizes(), op, ": dy shape ", dy_.sizes(), " differs from x shape ", x.sizes());
  const at::Tensor dy = dy_.to(x.scalar_type());  // y's dtype (the forward's out_dtype): x's for the kernels
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, op, ": weight must have shape [", N, "]");
  check_param_dtype(x, weight, op, "weight");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == M &&
                  rstd.numel() == M,
              op, ": mean/rstd must be float32 with ", M, " elements");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = nanogpt_cpu::new_output(x, x.sizes(), x.scalar_type());
  at::Tensor dw = nanogpt_cpu::new_output(weight, {N}, weight.scalar_type());
  at::Tensor db = nanogpt_cpu::new_output(weight, {has_bias ? N : 0}, weight.scalar_type());
  at::Tensor ws = at::empty({2 * ng_colsum_chunks(M) * N}, x.options().dtype(at::kFloat));
  check_launch(ng_layer_norm_bwd(dyc.data_ptr(), xc.data_ptr(), wc.data_ptr(), mc.data_ptr<float>(),
                                 rc.data_ptr<float>(), dx.data_ptr(), dw.data_ptr(), has_bias ? db.data_ptr() : nullptr,
                                 ws.data_ptr<float>(), M, N, dtype_code(x.scalar_type(), op, "x"),
                                 dtype_code(weight.scalar_type(), op, "weight"), c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, dw, db};
}

}  // namespace
}  // namespace nanogpt_cuda

TORCH_LIBRARY_IMPL(nanogpt_ext, CUDA, m) {
  m.impl("layer_norm", &nanogpt_cpu::layer_norm_plain);
  m.impl("layer_norm_fwd", &nanogpt_cuda::layer_norm_fwd);
  m.impl("layer_norm_bwd", &nanogpt_cuda::layer_norm_bwd);
}
#endif
