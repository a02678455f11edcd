// CUDA implementations of the nanogpt_ext ops: checks the tensors (device, dtype, shape,
// contiguity), allocates outputs and workspaces with torch's caching allocator and calls the
// torch-free launchers (launchers.h) on the current CUDA stream. Built only with
// NANOGPT_WITH_CUDA (torch with CUDA + nvcc); the .cu files are compiled by nvcc separately.
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::getCurrentCUDAStream)
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../ext_common.h"  // new_output (NaN poisoning for tests), check_adamw_args
#include "launchers.h"

namespace nanogpt_cuda {
namespace {

int dtype_code(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return NG_F32;
    case at::kBFloat16: return NG_BF16;
    case at::kHalf: return NG_F16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t, "; the CUDA kernels take float32, bfloat16 or float16");
  }
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

void check_on(const at::Tensor& t, const at::Device& dev, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but x is on ", dev);
}

// param (weight/bias) dtype must be x's dtype or float32
void check_param_dtype(const at::Tensor& x, const at::Tensor& p, const char* op, const char* name) {
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name, " dtype ",
              p.scalar_type(), " must be x's dtype (", x.scalar_type(), ") or float32");
}

int64_t rows_of(const at::Tensor& x) { return x.size(-1) > 0 ? x.numel() / x.size(-1) : 0; }

// bias_gelu's optional bias: [N] on x's device in x's dtype or float32; whether there is one
bool check_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value() || !bias->defined()) return false;
  check_on(*bias, x.device(), op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
  check_param_dtype(x, *bias, op, "bias");
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
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
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd, bool has_bias) {
  const char* op = "nanogpt_ext::layer_norm_bwd";
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1 && x.size(-1) > 0, op, ": x must be a CUDA tensor with a non-empty last dim");
  const int64_t N = x.size(-1), M = rows_of(x);
  for (auto* t : {&dy, &weight, &mean, &rstd}) check_on(*t, x.device(), op, "every argument");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op, ": dy (", dy.sizes(), ", ",
              dy.scalar_type(), ") must match x (", x.sizes(), ", ", x.scalar_type(), ")");
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

at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const char* op = "nanogpt_ext::bias_gelu_fwd";
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, op, ": x must be a CUDA tensor with at least 1 dimension");
  const int64_t N = x.size(-1), M = rows_of(x);
  const bool has_bias = check_bias(x, bias, N, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = nanogpt_cpu::new_output(x, x.sizes(), x.scalar_type());
  if (N == 0 || M == 0) return y;
  const int xd = dtype_code(x.scalar_type(), op, "x");
  check_launch(ng_bias_gelu_fwd(xc.data_ptr(), has_bias ? bc.data_ptr() : nullptr, y.data_ptr(), M, N, tanh, xd,
                                has_bias ? dtype_code(bias->scalar_type(), op, "bias") : xd,
                                c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& bias, bool tanh) {
  const char* op = "nanogpt_ext::bias_gelu_bwd";
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
  check_launch(ng_bias_gelu_bwd(dyc.data_ptr(), xc.data_ptr(), has_bias ? bc.data_ptr() : nullptr, dx.data_ptr(),
                                has_bias ? db.data_ptr() : nullptr, has_bias ? ws.data_ptr<float>() : nullptr, M, N,
                                tanh, xd, has_bias ? dtype_code(bias->scalar_type(), op, "bias") : xd,
                                c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, db};
}

at::Tensor grad_norm(at::TensorList grads) {
  const char* op = "nanogpt_ext::grad_norm";
  TORCH_CHECK(!grads.empty(), op, ": no gradients");
  const at::Device dev = grads[0].device();
  std::vector<at::Tensor> keep;
  std::vector<const void*> ptrs;
  std::vector<int> dtypes;
  std::vector<int64_t> numels;
  for (const at::Tensor& g : grads) {
    check_on(g, dev, op, "every gradient");
    keep.push_back(g.contiguous());
    ptrs.push_back(keep.back().data_ptr());
    dtypes.push_back(dtype_code(g.scalar_type(), op, "a gradient"));
    numels.push_back(g.numel());
  }
  const c10::cuda::CUDAGuard guard(dev);
  const int n = static_cast<int>(ptrs.size());
  at::Tensor ws = at::empty({ng_grad_norm_workspace(numels.data(), n)}, grads[0].options().dtype(at::kDouble));
  at::Tensor out = at::empty({}, grads[0].options().dtype(at::kFloat));
  check_launch(ng_grad_norm(ptrs.data(), dtypes.data(), numels.data(), n, ws.data_ptr<double>(),
                            out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

void adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList steps, const at::Tensor& lr, const at::Tensor& norm, double beta1, double beta2,
            double eps, double weight_decay, double max_grad_norm) {
  const char* op = "nanogpt_ext::adamw_";
  const size_t n = params.size();
  nanogpt_cpu::check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, steps, lr, norm, op);
  if (n == 0) return;
  const at::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor lr_d = lr.to(dev, at::kDouble);  // async: no host sync
  const at::Tensor norm_d = norm.to(dev, at::kFloat);
  std::vector<at::Tensor> keep;
  // one launcher call per param dtype
  for (int code : {NG_F32, NG_BF16, NG_F16}) {
    std::vector<void*> p;
    std::vector<const void*> g;
    std::vector<float*> m, v, s;
    std::vector<int64_t> numel;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& pi = params[i];
      check_on(pi, dev, op, "every param");
      if (dtype_code(pi.scalar_type(), op, "a param") != code) continue;
      keep.push_back(grads[i].contiguous());
      p.push_back(pi.data_ptr());
      g.push_back(keep.back().data_ptr());
      m.push_back(exp_avgs[i].data_ptr<float>());
      v.push_back(exp_avg_sqs[i].data_ptr<float>());
      s.push_back(steps[i].data_ptr<float>());
      numel.push_back(pi.numel());
    }
    if (p.empty()) continue;
    check_launch(ng_adamw(p.data(), g.data(), m.data(), v.data(), s.data(), numel.data(), static_cast<int>(p.size()),
                          code, lr_d.data_ptr<double>(), norm_d.data_ptr<float>(), static_cast<float>(beta1),
                          static_cast<float>(beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
                          static_cast<float>(max_grad_norm), c10::cuda::getCurrentCUDAStream()),
                 op);
  }
}

}  // namespace nanogpt_cuda

TORCH_LIBRARY_IMPL(nanogpt_ext, CUDA, m) {
  m.impl("layer_norm_fwd", &nanogpt_cuda::layer_norm_fwd);
  m.impl("layer_norm_bwd", &nanogpt_cuda::layer_norm_bwd);
  m.impl("bias_gelu_fwd", &nanogpt_cuda::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &nanogpt_cuda::bias_gelu_bwd);
  m.impl("grad_norm", &nanogpt_cuda::grad_norm);
  m.impl("adamw_", &nanogpt_cuda::adamw_);
}
