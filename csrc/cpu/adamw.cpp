// Fused multi-tensor AdamW for CPU. grad_norm: one deterministic reduction over every
// gradient (fixed 64K-element blocks -> fp64 partial sums of squares -> ordered fp64 sum).
// adamw_: one call over lists of params/grads/exp_avg/exp_avg_sq/step; per element, in fp32:
//   g = grad * clip, clip = min(1, max_grad_norm / (norm + 1e-6)) (1 when max_grad_norm <= 0)
//   p *= 1 - lr*wd;  m += (1-b1)(g - m);  v = b2 v + (1-b2) g^2
//   p += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// which is torch.optim.AdamW's single-tensor order of operations. A non-finite norm leaves
// params, state and steps untouched. Params/grads in {fp32, bf16}; state in fp32.
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace nanogpt_cpu {
namespace adam {

constexpr int64_t kNormBlock = 1 << 16;
constexpr int64_t kStepBlock = 1 << 14;

// fp64 accumulation (the loop is memory-bound, so it costs nothing and keeps 1e-7 accuracy)
template <class T>
NG_INLINE double sumsq(const T* __restrict g, int64_t n) {
  double s = 0.0;
  NG_SIMD_SUM(s)
  for (int64_t i = 0; i < n; ++i) {
    const double v = ld(g, i);
    s += v * v;
  }
  return s;
}
NG_CLONES double sumsq_f32(const float* g, int64_t n) { return sumsq<float>(g, n); }
NG_CLONES double sumsq_bf16(const bf16_t* g, int64_t n) { return sumsq<bf16_t>(g, n); }

struct Hyper {
  float clip, decay, w1, beta2, w2, neg_step_size, bc2_sqrt, eps;
};

template <class T>
NG_INLINE void update(T* __restrict p, const T* __restrict g, float* __restrict m, float* __restrict v, int64_t n,
                      const Hyper& h) {
  const float clip = h.clip, decay = h.decay, w1 = h.w1, beta2 = h.beta2, w2 = h.w2;
  const float nss = h.neg_step_size, bc2s = h.bc2_sqrt, eps = h.eps;
  NG_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const float gi = ld(g, i) * clip;
    const float pi = ld(p, i) * decay;
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * beta2 + w2 * gi * gi;
    const float denom = std::sqrt(vi) / bc2s + eps;
    m[i] = mi;
    v[i] = vi;
    st(p, i, pi + (nss * mi) / denom);
  }
}
NG_CLONES void update_f32(float* p, const float* g, float* m, float* v, int64_t n, const Hyper& h) {
  update<float>(p, g, m, v, n, h);
}
NG_CLONES void update_bf16(bf16_t* p, const bf16_t* g, float* m, float* v, int64_t n, const Hyper& h) {
  update<bf16_t>(p, g, m, v, n, h);
}

void check_grad(const at::Tensor& g, const char* op, size_t i) {
  TORCH_CHECK(g.device().is_cpu(), op, ": tensor ", i, " is on ", g.device(), ", expected CPU");
  TORCH_CHECK(g.layout() == at::kStrided, op, ": tensor ", i, " is not a dense (strided) tensor");
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16, op, ": tensor ", i, " has dtype ",
              g.scalar_type(), "; CPU kernels take float32 or bfloat16");
}

}  // namespace adam

void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList steps, const at::Tensor& lr, const at::Tensor& norm, const char* op) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n, op,
              ": params, grads, exp_avgs, exp_avg_sqs and steps must have the same length (got ", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(), ")");
  TORCH_CHECK(lr.numel() == 1 && norm.numel() == 1, op, ": lr and norm must be one-element tensors");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i];
    TORCH_CHECK(p.is_contiguous(), op, ": param ", i, " must be contiguous");
    for (const at::Tensor* t : {&g, &exp_avgs[i], &exp_avg_sqs[i], &steps[i]})
      TORCH_CHECK(t->device() == p.device(), op, ": the grad and state of param ", i, " must be on its device ",
                  p.device(), ", got ", t->device());
    TORCH_CHECK(g.scalar_type() == p.scalar_type() && g.numel() == p.numel(), op, ": grad ", i, " (",
                g.scalar_type(), ", ", g.numel(), " elements) does not match its param (", p.scalar_type(), ", ",
                p.numel(), ")");
    for (const at::Tensor* st : {&exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(st->scalar_type() == at::kFloat && st->is_contiguous() && st->numel() == p.numel(), op,
                  ": exp_avg/exp_avg_sq ", i, " must be contiguous float32 with ", p.numel(), " elements");
    TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1, op, ": step ", i,
                " must be a one-element float32 tensor");
  }
}

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
  at::parallel_for(0, static_cast<int64_t>(items.size()), 4, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      const at::Tensor& g = gs[it.t];
      part[k] = g.scalar_type() == at::kFloat
                    ? adam::sumsq_f32(g.data_ptr<float>() + it.off, it.n)
                    : adam::sumsq_bf16(reinterpret_cast<const bf16_t*>(g.data_ptr()) + it.off, it.n);
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
  std::vector<adam::Hyper> hyper(n);
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
    hyper[i] = adam::Hyper{clip,
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
  at::parallel_for(0, static_cast<int64_t>(items.size()), 2, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      const at::Tensor& p = params[it.t];
      float* m = exp_avgs[it.t].data_ptr<float>() + it.off;
      float* v = exp_avg_sqs[it.t].data_ptr<float>() + it.off;
      if (p.scalar_type() == at::kFloat)
        adam::update_f32(p.data_ptr<float>() + it.off, gs[it.t].data_ptr<float>() + it.off, m, v, it.n,
                         hyper[it.t]);
      else
        adam::update_bf16(reinterpret_cast<bf16_t*>(p.data_ptr()) + it.off,
                          reinterpret_cast<const bf16_t*>(gs[it.t].data_ptr()) + it.off, m, v, it.n, hyper[it.t]);
    }
  });
}

}  // namespace nanogpt_cpu
