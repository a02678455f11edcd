// Torch-side helpers of the ops' CPU glue (csrc/<op>.cpp: checks, outputs, op registration).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "../ext_common.h"
#include "common.h"

namespace nanogpt_cpu {

// a tensor's data as the kernels' storage type (bf16_t for bfloat16)
template <class T>
T* data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// f(T{}, P{}) with the storage types of an (activation, parameter) dtype pair the row kernels
// take: x in {float32, bfloat16}, the parameter (`pname`) in x's dtype or float32
template <class F>
void with_row_dtypes(at::ScalarType xt, at::ScalarType pt, const char* op, const char* pname, F&& f) {
  if (xt == at::kFloat && pt == at::kFloat) return f(float{}, float{});
  if (xt == at::kBFloat16 && pt == at::kBFloat16) return f(bf16_t{}, bf16_t{});
  if (xt == at::kBFloat16 && pt == at::kFloat) return f(bf16_t{}, float{});
  TORCH_CHECK(false, op, ": unsupported dtypes x=", xt, " ", pname, "=", pt, " (CPU kernels take x in float32/bfloat16 and ",
              pname, " in x's dtype or float32)");
}

// f(Y{}) with the storage type of a norm's output (and its gradient) in dtype `out`, when the row kernels write it
// from an x of storage type T: T itself, or bf16 for an fp32 x (what autocast's next matmul takes); false when they
// do not (the glue then computes in x's dtype and casts)
template <class T, class F>
bool with_out_type(at::ScalarType out, F&& f) {
  constexpr bool fp32 = std::is_same_v<T, float>;
  if (out == (fp32 ? at::kFloat : at::kBFloat16)) return f(T{}), true;
  if (fp32 && out == at::kBFloat16) return f(bf16_t{}), true;
  return false;
}

// the op nanogpt_ext::<name> with signature Sig, for calls through the dispatcher (keep it in a static)
template <class Sig>
c10::TypedOperatorHandle<Sig> ext_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("nanogpt_ext::") + name).c_str(), "").typed<Sig>();
}

}  // namespace nanogpt_cpu
