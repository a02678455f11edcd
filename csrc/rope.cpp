// Rotary position embeddings on q and k (B, H, T, D) in one op (Hugging Face's rotate-half convention): with
// x1, x2 the halves of a row, out = cat(x1 cos - x2 sin, x2 cos + x1 sin), cos and sin (T, D/2) float32, fp32
// math. q and k (k may have its own H) share a dtype in {fp32, bf16} (+ fp16 on CUDA); any strides with a
// contiguous last dim; the outputs are contiguous. The backward is the inverse turn (sin negated) by the same
// kernel. Defines nanogpt_ext::rope (C++ autograd over rope_fwd) and registers the CPU kernel
// (cpu/rope_kernels.h) and, built with CUDA, the CUDA one (cuda/rope.cu).
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "cpu/glue.h"
#ifdef NANOGPT_WITH_CUDA
#include "cuda/glue.h"
#endif
#define NG_KERNELS "rope_kernels.h"
#include "cpu/isa_clones.h"

namespace nanogpt_cpu {
namespace {

// the shapes and dtypes rope_fwd takes on every device (the devices are checked by each device's glue)
void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                     const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(3) == k.size(3) && q.size(3) % 2 == 0,
              op, ": q ", q.sizes(), " and k ", k.sizes(), " must be (B, H, T, D) with one B, T and an even D");
  const int64_t T = q.size(2), half = q.size(3) / 2;
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({T, half}) && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              op, ": cos and sin must be float32 (T, D/2) = (", T, ", ", half, "), got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k dtypes differ (", q.scalar_type(), ", ",
              k.scalar_type(), ")");
}

std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool inverse) {
  const char* op = "nanogpt_ext::rope_fwd";
  for (auto* t : {&q, &k, &cos, &sin}) check_cpu(*t, op, "every argument");
  check_rope_args(q, k, cos, sin, op);
  const int64_t T = q.size(2), half = q.size(3) / 2;
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous(), kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor qo = new_output(q, q.sizes(), q.scalar_type()), ko = new_output(k, k.sizes(), q.scalar_type());
  const float sign = inverse ? -1.0f : 1.0f;
  with_row_dtypes(q.scalar_type(), q.scalar_type(), op, "k", [&](auto t, auto) {
    using X = decltype(t);
    const auto rotate = NG_ISA_PICK(rp::rotate<X>);
    for (auto [x, o] : {std::pair{&qc, &qo}, std::pair{&kc, &ko}}) {
      const int64_t rows = x->numel() / std::max<int64_t>(1, 2 * half);
      if (half == 0) continue;
      at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / half), [&](int64_t r0, int64_t r1) {
        rotate(data<X>(*x), data<X>(*o), cc.data_ptr<float>(), sc.data_ptr<float>(), r0, r1, x->size(1), T,
               x->stride(0), x->stride(1), x->stride(2), half, sign);
      });
    }
  });
  return {qo, ko};
}

const c10::TypedOperatorHandle<decltype(rope_fwd)>& fwd_op() {
  static const auto op = ext_op<decltype(rope_fwd)>("rope_fwd");
  return op;
}

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [qo, ko] = fwd_op().call(q, k, cos, sin, false);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["heads"] = std::vector<int64_t>{q.size(1), k.size(1)};
    return {qo, ko};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // an output whose gradient never came (only q_rot used, say) gets zeros
    const at::Tensor& some = grads[0].defined() ? grads[0] : grads[1];
    const auto heads = ctx->saved_data["heads"].toIntVector();
    const auto grad_or_zeros = [&](int i) {
      return grads[i].defined() ? grads[i]
                                : at::zeros({some.size(0), heads[i], some.size(2), some.size(3)}, some.options());
    };
    const at::Tensor dq = grad_or_zeros(0), dk = grad_or_zeros(1);
    auto [gq, gk] = fwd_op().call(dq, dk, saved[0], saved[1], true);
    return {gq, gk, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rope_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                 const at::Tensor& sin) {
  auto out = RopeFn::apply(q, k, cos, sin);
  return {out[0], out[1]};
}
// below autograd (no grad needed, inference mode): just the forward kernel, on any device
std::tuple<at::Tensor, at::Tensor> rope_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin) {
  return fwd_op().call(q, k, cos, sin, false);
}

}  // namespace
}  // namespace nanogpt_cpu

TORCH_LIBRARY_FRAGMENT(nanogpt_ext, m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, Autograd, m) { m.impl("rope", &nanogpt_cpu::rope_autograd); }

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("rope", &nanogpt_cpu::rope_plain);
  m.impl("rope_fwd", &nanogpt_cpu::rope_fwd);
}

#ifdef NANOGPT_WITH_CUDA
namespace nanogpt_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool inverse) {
  const char* op = "nanogpt_ext::rope_fwd";
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  for (auto* t : {&k, &cos, &sin}) check_on(*t, q.device(), op, "every argument");
  nanogpt_cpu::check_rope_args(q, k, cos, sin, op);
  const int dtype = dtype_code(q.scalar_type(), op, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous(), kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor qo = nanogpt_cpu::new_output(q, q.sizes(), q.scalar_type());
  at::Tensor ko = nanogpt_cpu::new_output(k, k.sizes(), q.scalar_type());
  const int64_t qs[3] = {qc.stride(0), qc.stride(1), qc.stride(2)}, ks[3] = {kc.stride(0), kc.stride(1), kc.stride(2)};
  check_launch(ng_rope(qc.data_ptr(), kc.data_ptr(), qo.data_ptr(), ko.data_ptr(), cc.data_ptr<float>(),
                       sc.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2), q.size(3) / 2, qs, ks,
                       inverse ? -1.0f : 1.0f, dtype, c10::cuda::getCurrentCUDAStream()),
               op);
  return {qo, ko};
}

}  // namespace
}  // namespace nanogpt_cuda

TORCH_LIBRARY_IMPL(nanogpt_ext, CUDA, m) {
  m.impl("rope", &nanogpt_cpu::rope_plain);
  m.impl("rope_fwd", &nanogpt_cuda::rope_fwd);
}
#endif
