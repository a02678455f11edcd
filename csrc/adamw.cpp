// Fused multi-tensor AdamW for CPU. grad_norm: one deterministic reduction over every
// gradient (fixed 64K-element blocks -> fp64 partial sums of squares -> ordered fp64 sum).
// adamw_: one call over lists of params/grads/exp_avg/exp_avg_sq/step; per element, in fp32:
//   g = grad * clip, clip = min(1, max_grad_norm / (norm + 1e-6)) (1 when max_grad_norm <= 0)
//   p *= 1 - lr*wd;  m += (1-b1)(g - m);  v = b2 v + (1-b2) g^2
//   p += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// which is torch.optim.AdamW's single-tensor order of operations. A non-finite norm leaves
// params, state and steps untouched. Params/grads in {fp32, bf16}; state in fp32. Leaf loops in
// cpu/adamw_kernels.h; built with CUDA, also registers the CUDA kernels (cuda/adamw.cu; fp16 too).
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <vector>

#include "cpu/glue.h"
#ifdef NANOGPT_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace nanogpt_cpu {
namespace {
struct AdamHyper {  // one tensor's step scalars (adamw_kernels.h)
  float clip, decay, w1, beta2, w2, neg_step_size, bc2_sqrt, eps;
};
}  // namespace
}  // namespace nanogpt_cpu
#define NG_KERNELS "adamw_kernels.h"
#include "cpu/isa_clones.h"

namespace nanogpt_cpu {
namespace {
namespace adam {

constexpr int64_t kNormBlock = 1 << 16;
constexpr int64_t kStepBlock = 1 << 14;

void check_grad(const at::Tensor& g, const char* op, size_t i) {
  TORCH_CHECK(g.device().is_cpu(), op, ": tensor ", i, " is on ", g.device(), ", expected CPU");
  TORCH_CHECK(g.layout() == at::kStrided, op, ": tensor ", i, " is not a dense (strided) tensor");
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16, op, ": tensor ", i, " has dtype ",
              g.scalar_type(), "; CPU kernels take float32 or bfloat16");
}

}  // namespace adam

at::Tensor grad_norm(at::TensorList grads) {
  const char* op = "nanogpt_ext::grad_norm";
  std::vector<at::Tensor> gs;
  gs.reserve(grads.size());
  struct Item {
    int64_t t, off, n;
  };
  std::vector<Item> items;
  for (size_t i = 0; i < grads.size(); ++i) {
    adam::check_grad(grads[i], op, i);
    gs.push_back(grads[i].contiguous());
    const int64_t n = grads[i].numel();
    for (int64_t off = 0; off < n; off += adam::kNormBlock)
      items.push_back({static_cast<int64_t>(i), off, std::min(adam::kNormBlock, n - off)});
  }
  std::vector<double> part(items.size());
  const auto sumsq_f32 = NG_ISA_PICK(adam::sumsq<float>);
  const auto sumsq_bf16 = NG_ISA_PICK(adam::sumsq<bf16_t>);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 4, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      const at::Tensor& g = gs[it.t];
      part[k] = g.scalar_type() == at::kFloat ? sumsq_f32(data<float>(g) + it.off, it.n)
                                              : sumsq_bf16(data<bf16_t>(g) + it.off, it.n);
    }
  });
  double total = 0.0;
  for (double p : part) total += p;
  return at::scalar_tensor(std::sqrt(total), at::TensorOptions().dtype(at::kFloat));
}

void adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
            at::TensorList steps, const at::Tensor& lr, const at::Tensor& norm, double beta1, double beta2,
            double eps, double weight_decay, double max_grad_norm) {
  const char* op = "nanogpt_ext::adamw_";
  const size_t n = params.size();
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, steps, lr, norm, op);
  const float normf = norm.item<float>();
  if (!std::isfinite(normf)) return;  // skipped step: nothing is touched
  const double lrd = lr.item<double>();
  float clip = 1.0f;
  if (max_grad_norm > 0) {
    clip = static_cast<float>(max_grad_norm) / (normf + 1e-6f);
    clip = clip < 1.0f ? clip : 1.0f;
  }
  std::vector<at::Tensor> gs(n);
  std::vector<AdamHyper> hyper(n);
  struct Item {
    int64_t t, off, n;
  };
  std::vector<Item> items;
  for (size_t i = 0; i < n; ++i) {
    adam::check_grad(params[i], op, i);
    adam::check_grad(grads[i], op, i);
    gs[i] = grads[i].contiguous();
  }
  // all checks passed: count the step and set up each tensor's scalars
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &s = steps[i];
    float* sp = s.data_ptr<float>();  // float32 (checked): no dispatcher round trips
    const double step = static_cast<double>(*sp) + 1.0;
    *sp = static_cast<float>(step);
    const double bc1 = 1.0 - std::pow(beta1, step), bc2 = 1.0 - std::pow(beta2, step);
    hyper[i] = AdamHyper{clip,
                           static_cast<float>(1.0 - lrd * weight_decay),
                           static_cast<float>(1.0 - beta1),
                           static_cast<float>(beta2),
                           static_cast<float>(1.0 - beta2),
                           static_cast<float>(-(lrd / bc1)),
                           static_cast<float>(std::sqrt(bc2)),
                           static_cast<float>(eps)};
    const int64_t numel = p.numel();
    for (int64_t off = 0; off < numel; off += adam::kStepBlock)
      items.push_back({static_cast<int64_t>(i), off, std::min(adam::kStepBlock, numel - off)});
  }
  const auto update_f32 = NG_ISA_PICK(adam::update<float>);
  const auto update_bf16 = NG_ISA_PICK(adam::update<bf16_t>);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 2, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      const at::Tensor& p = params[it.t];
      float* m = exp_avgs[it.t].data_ptr<float>() + it.off;
      float* v = exp_avg_sqs[it.t].data_ptr<float>() + it.off;
      if (p.scalar_type() == at::kFloat)
        update_f32(data<float>(p) + it.off, data<float>(gs[it.t]) + it.off, m, v, it.n, hyper[it.t]);
      else
        update_bf16(data<bf16_t>(p) + it.off, data<bf16_t>(gs[it.t]) + it.off, m, v, it.n, hyper[it.t]);
    }
  });
}

}  // namespace
}  // namespace nanogpt_cpu

TORCH_LIBRARY_FRAGMENT(nanogpt_ext, m) {
  m.def("grad_norm(Tensor[] grads) -> Tensor");
  m.def("adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
        " Tensor(d!)[] steps, Tensor lr, Tensor norm, float beta1, float beta2, float eps, float weight_decay,"
        " float max_grad_norm) -> ()");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("grad_norm", &nanogpt_cpu::grad_norm);
  m.impl("adamw_", &nanogpt_cpu::adamw_);
}

#ifdef NANOGPT_WITH_CUDA
namespace nanogpt_cuda {
namespace {

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

}  // namespace
}  // namespace nanogpt_cuda

TORCH_LIBRARY_IMPL(nanogpt_ext, CUDA, m) {
  m.impl("grad_norm", &nanogpt_cuda::grad_norm);
  m.impl("adamw_", &nanogpt_cuda::adamw_);
}
#endif
