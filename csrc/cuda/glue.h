// Torch-side helpers of the ops' CUDA glue (the NANOGPT_WITH_CUDA part of csrc/<op>.cpp): it checks the
// tensors (device, dtype, shape), allocates outputs and workspaces with torch's caching allocator and calls the
// torch-free launchers (launchers.h; the .cu files are compiled by nvcc on their own) on the current stream.
#pragma once
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (= at::cuda::getCurrentCUDAStream)

#include <optional>

#include "../ext_common.h"  // new_output (NaN poisoning for tests), check_adamw_args
#include "launchers.h"

namespace nanogpt_cuda {

inline int dtype_code(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return NG_F32;
    case at::kBFloat16: return NG_BF16;
    case at::kHalf: return NG_F16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t, "; the CUDA kernels take float32, bfloat16 or float16");
  }
}

inline void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

inline void check_on(const at::Tensor& t, const at::Device& dev, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but x is on ", dev);
}

// param (weight/bias) dtype must be x's dtype or float32
inline void check_param_dtype(const at::Tensor& x, const at::Tensor& p, const char* op, const char* name) {
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name, " dtype ",
              p.scalar_type(), " must be x's dtype (", x.scalar_type(), ") or float32");
}

inline int64_t rows_of(const at::Tensor& x) { return x.size(-1) > 0 ? x.numel() / x.size(-1) : 0; }

// bias_gelu's optional bias: [N] on x's device in x's dtype or float32; whether there is one
inline bool check_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value() || !bias->defined()) return false;
  check_on(*bias, x.device(), op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
  check_param_dtype(x, *bias, op, "bias");
  return true;
}

}  // namespace nanogpt_cuda
