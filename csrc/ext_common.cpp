// Definitions of ext_common.h.
#include "ext_common.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <string>

namespace nanogpt_cpu {

bool poison_outputs() {  // read on every call, so tests can switch it on and off
  const char* v = std::getenv("NANOGPT_POISON");
  return v && *v && std::string(v) != "0";
}

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  auto t = at::empty(sizes, like.options().dtype(dtype));
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

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

}  // namespace nanogpt_cpu
