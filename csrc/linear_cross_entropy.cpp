// Fused linear + cross-entropy, CPU: loss = CE(x W^T + b, targets) without the (N, V) logits. Row chunks of
// logits come from at::mm (oneDNN/BLAS, in x's dtype); the leaf pass (linear_cross_entropy_kernels.h) turns
// each chunk into its rows' losses and, in place, its gradient; dx = dlogits W and dW += dlogits^T x follow
// before the next chunk. The gradient is taken in the forward and saved (as Liger does): the backward only
// scales it, so the logits are computed once (3 matmuls, as unfused). It is the summed loss's gradient
// whatever the reduction: the mean's 1/count joins the output's grad in the backward. x, weight, bias: one
// dtype, fp32 or bf16; fp32 softmax, loss, dW/db accumulation. Defines nanogpt_ext::linear_cross_entropy
// (C++ autograd over linear_cross_entropy_fwd) and registers the CPU kernel; the chunk's rows come from
// Python (nanogpt_kernels.registry.lce_chunk_rows, one rule for every backend).
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "cpu/glue.h"
#define NG_KERNELS "linear_cross_entropy_kernels.h"
#include "cpu/isa_clones.h"

namespace nanogpt_cpu {
namespace {

using Out4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Out4 lce_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets,
             const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction, double softcap,
             int64_t chunk, bool with_grad) {
  const char* op = "nanogpt_ext::linear_cross_entropy_fwd";
  at::AutoDispatchBelowADInplaceOrView guard;  // the gradient is computed here, not recorded
  for (const at::Tensor* t : {&x, &weight, &targets}) check_cpu(*t, op, "x, weight and targets");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1) && targets.dim() == 1 &&
                  targets.size(0) == x.size(0),
              op, ": expected x (N, C), weight (V, C), targets (N,), got ", x.sizes(), ", ", weight.sizes(), ", ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && weight.scalar_type() == dt, op,
              ": x and weight must both be float32 or both bfloat16, got ", dt, " and ", weight.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == dt, op,
                ": bias must be (V,) in x's dtype, got ", bias->sizes(), " ", bias->scalar_type());
  }
  TORCH_CHECK(reduction == "mean" || reduction == "sum", op, ": reduction must be mean or sum, got ", reduction);
  TORCH_CHECK(chunk >= 1 && softcap >= 0.0, op, ": chunk must be >= 1 and softcap >= 0 (0: none)");
  const int64_t N = x.size(0), C = x.size(1), V = weight.size(0);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), tc = targets.contiguous();
  const int64_t* tgt = tc.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (tgt[r] == ignore_index) continue;
    TORCH_CHECK(tgt[r] >= 0 && tgt[r] < V, op, ": target ", tgt[r], " at row ", r, " is out of range [0, ", V, ")");
    ++count;
  }
  const int64_t G = with_grad ? 1 : 0;
  at::Tensor dx = new_output(x, {G * N, C}, dt);
  at::Tensor dw = at::zeros({G * V, C}, x.options().dtype(at::kFloat));
  at::Tensor db = at::zeros({has_bias ? G * V : 0}, x.options().dtype(at::kFloat));
  std::vector<float> losses(N);
  const at::Tensor wt = wc.t();
  // one logits buffer for every chunk (and one for bf16's dW product): a fresh allocation of this size per
  // chunk is a fresh mmap whose pages the kernel faults in and zeroes each time
  const at::Tensor buf = at::empty({std::min(chunk, N), V}, x.options());
  at::Tensor dw_part = with_grad && dt != at::kFloat ? at::empty({V, C}, x.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t n = std::min(chunk, N - r0);
    const at::Tensor xs = xc.narrow(0, r0, n);
    at::Tensor logits = buf.narrow(0, 0, n);
    if (has_bias) at::addmm_out(logits, *bias, xs, wt);
    else at::mm_out(logits, xs, wt);
    with_row_dtypes(dt, dt, op, "weight", [&](auto t, auto) {
      using T = decltype(t);
      const auto pass = NG_ISA_PICK(lce::rows<T>);
      T* lp = data<T>(logits);
      at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t a, int64_t b) {
        std::vector<float> z(V);
        pass(lp, tgt + r0, losses.data() + r0, z.data(), a, b, V, ignore_index, static_cast<float>(softcap), with_grad);
      });
    });
    if (!with_grad) continue;
    at::Tensor dxs = dx.narrow(0, r0, n);
    at::mm_out(dxs, logits, wc);
    if (dt == at::kFloat) dw.addmm_(logits.t(), xs);
    else dw.add_(at::mm_out(dw_part, logits.t(), xs));  // each chunk's product rounded once, summed in fp32
    if (has_bias) db.add_(logits.sum(0, false, at::kFloat));
  }
  double total = 0.0;  // in order: deterministic
  for (float l : losses) total += l;
  if (reduction == "mean") total /= static_cast<double>(count);  // no row counts: 0/0 = nan, as F.cross_entropy
  return {at::scalar_tensor(total, x.options().dtype(at::kFloat)), dx, dw.to(dt), db.to(dt)};
}

using FwdSig = decltype(lce_fwd);
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = ext_op<FwdSig>("linear_cross_entropy_fwd");
  return op;
}

struct LceFn : public torch::autograd::Function<LceFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& targets, const std::optional<at::Tensor>& bias, int64_t ignore_index,
                            c10::string_view reduction, double softcap, int64_t chunk) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, dx, dw, db] = fwd_op().call(x, weight, targets, bias, ignore_index, reduction, softcap, chunk, true);
    ctx->save_for_backward({dx, dw, db, targets});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["mean"] = reduction == "mean";
    ctx->saved_data["ignore_index"] = ignore_index;
    return loss;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor g = grads[0];
    if (ctx->saved_data["mean"].toBool())  // no row counts: the gradient is 0 (the sum's), as F.cross_entropy gives
      g = g.div(saved[3].ne(ctx->saved_data["ignore_index"].toInt()).sum().clamp_min(1));
    // in place: the weight's gradient is as large as the weight; a second backward through this graph raises
    // (the saved tensors' version changed) rather than scaling twice
    return {saved[0].mul_(g), saved[1].mul_(g), at::Tensor(),
            ctx->saved_data["has_bias"].toBool() ? saved[2].mul_(g) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// below autograd, or no gradient wanted: the loss alone (the forward skips the gradient)
at::Tensor lce_plain(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets,
                     const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction,
                     double softcap, int64_t chunk) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return std::get<0>(fwd_op().call(x, weight, targets, bias, ignore_index, reduction, softcap, chunk, false));
}

at::Tensor lce_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets,
                        const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction,
                        double softcap, int64_t chunk) {
  const bool want = at::GradMode::is_enabled() &&
                    (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!want) return lce_plain(x, weight, targets, bias, ignore_index, reduction, softcap, chunk);
  return LceFn::apply(x, weight, targets, bias, ignore_index, reduction, softcap, chunk);
}

}  // namespace
}  // namespace nanogpt_cpu

TORCH_LIBRARY_FRAGMENT(nanogpt_ext, m) {
  m.def("linear_cross_entropy(Tensor x, Tensor weight, Tensor targets, Tensor? bias, int ignore_index,"
        " str reduction, float softcap, int chunk) -> Tensor");
  m.def("linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor targets, Tensor? bias, int ignore_index,"
        " str reduction, float softcap, int chunk, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, Autograd, m) {
  m.impl("linear_cross_entropy", &nanogpt_cpu::lce_autograd);
}

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("linear_cross_entropy", &nanogpt_cpu::lce_plain);
  m.impl("linear_cross_entropy_fwd", &nanogpt_cpu::lce_fwd);
}
