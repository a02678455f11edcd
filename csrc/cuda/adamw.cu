// Multi-tensor AdamW and gradient norm, CUDA, torch-free. Tensor addresses are packed into
// kernel-argument structs (up to kMaxTensors tensors and kMaxBlocks blocks of kChunk elements
// per launch, apex-style, under the 4 KB parameter limit), so there is no host<->device copy
// and no sync. Everything the step depends on that may change between steps -- the grad norm
// (hence the clip factor and the skip of non-finite steps), lr, and each tensor's step
// counter -- is read from device memory, so a step can be captured in a CUDA graph.
// Math and state in fp32 (bias corrections in fp64), torch.optim.AdamW's order of operations.
#include "common.cuh"

#include <math.h>

namespace ng {
namespace {

constexpr int kChunk = 16384;  // elements per block
constexpr int kThreads = 512;
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;

struct NormArgs {
  const void* g[kMaxTensors];
  int64_t n[kMaxTensors];
  unsigned char dtype[kMaxTensors];
  unsigned char tensor[kMaxBlocks];
  int chunk[kMaxBlocks];
};

struct AdamArgs {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  float* m[kMaxTensors];
  float* v[kMaxTensors];
  float* step[kMaxTensors];
  int64_t n[kMaxTensors];
  unsigned char tensor[kMaxBlocks];
  int chunk[kMaxBlocks];
};
static_assert(sizeof(AdamArgs) + 64 <= 4096, "kernel parameters must fit in 4 KB");
static_assert(sizeof(NormArgs) + 64 <= 4096, "kernel parameters must fit in 4 KB");

template <class T>
__device__ __forceinline__ float sumsq_range(const T* __restrict__ g, int64_t lo, int64_t hi) {
  float s = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const float v = to_f(g[i]);
    s += v * v;
  }
  return s;
}

// fixed-shape block reduction (deterministic)
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double sh[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  double r = 0.0;
  if (threadIdx.x < 32) {
    r = threadIdx.x < kThreads / 32 ? sh[threadIdx.x] : 0.0;
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  }
  return r;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) sumsq_kernel(NormArgs a, double* __restrict__ partial) {
  const int t = a.tensor[blockIdx.x];
  const int64_t lo = static_cast<int64_t>(a.chunk[blockIdx.x]) * kChunk;
  const int64_t hi = min(a.n[t], lo + kChunk);
  float s;
  switch (a.dtype[t]) {
    case NG_BF16: s = sumsq_range(static_cast<const __nv_bfloat16*>(a.g[t]), lo, hi); break;
    case NG_F16: s = sumsq_range(static_cast<const __half*>(a.g[t]), lo, hi); break;
    default: s = sumsq_range(static_cast<const float*>(a.g[t]), lo, hi); break;
  }
  const double r = block_sum(static_cast<double>(s));
  if (threadIdx.x == 0) partial[blockIdx.x] = r;
}

__global__ void __launch_bounds__(kThreads) norm_final_kernel(const double* __restrict__ partial, int64_t n,
                                                              float* __restrict__ out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  const double r = block_sum(s);
  if (threadIdx.x == 0) *out = static_cast<float>(sqrt(r));
}

template <class T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamArgs a, const double* __restrict__ lr_p,
                                                         const float* __restrict__ norm_p, float beta1, float beta2,
                                                         float eps, float wd, float max_norm) {
  const float norm = *norm_p;
  if (!isfinite(norm)) return;  // skipped step
  const int t = a.tensor[blockIdx.x];
  const int64_t lo = static_cast<int64_t>(a.chunk[blockIdx.x]) * kChunk;
  const int64_t hi = min(a.n[t], lo + kChunk);
  const double lr = *lr_p;
  const double step = static_cast<double>(*a.step[t]) + 1.0;  // incremented by adamw_step_kernel afterwards
  const double bc1 = 1.0 - pow(static_cast<double>(beta1), step);
  const double bc2 = 1.0 - pow(static_cast<double>(beta2), step);
  const float neg_step_size = static_cast<float>(-(lr / bc1));
  const float bc2_sqrt = static_cast<float>(sqrt(bc2));
  const float decay = static_cast<float>(1.0 - lr * static_cast<double>(wd));
  float clip = 1.f;
  if (max_norm > 0.f) clip = fminf(1.f, max_norm / (norm + 1e-6f));
  const float w1 = 1.f - beta1, w2 = 1.f - beta2;
  T* __restrict__ p = static_cast<T*>(a.p[t]);
  const T* __restrict__ g = static_cast<const T*>(a.g[t]);
  float* __restrict__ m = a.m[t];
  float* __restrict__ v = a.v[t];
  auto upd = [&](float& pi, float gi, float& mi, float& vi) {
    gi *= clip;
    pi *= decay;
    mi = mi + w1 * (gi - mi);
    vi = vi * beta2 + w2 * gi * gi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    pi = pi + (neg_step_size * mi) / denom;
  };
  const bool vec = ((reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g)) % (4 * sizeof(T)) == 0) &&
                   ((reinterpret_cast<uintptr_t>(m) | reinterpret_cast<uintptr_t>(v)) % 16 == 0) && lo % 4 == 0;
  int64_t i = lo;
  if (vec) {
    for (int64_t k = lo + 4 * static_cast<int64_t>(threadIdx.x); k + 4 <= hi; k += 4 * kThreads) {
      float pv[4], gv[4], mv[4], vv[4];
      load_f<T, 4>(p + k, pv);
      load_f<T, 4>(g + k, gv);
      load_f<float, 4>(m + k, mv);
      load_f<float, 4>(v + k, vv);
#pragma unroll
      for (int j = 0; j < 4; ++j) upd(pv[j], gv[j], mv[j], vv[j]);
      store_f<T, 4>(p + k, pv);
      store_f<float, 4>(m + k, mv);
      store_f<float, 4>(v + k, vv);
    }
    i = lo + (hi - lo) / 4 * 4;  // scalar tail
  }
  for (int64_t k = i + threadIdx.x; k < hi; k += kThreads) {
    float pi = to_f(p[k]), mi = m[k], vi = v[k];
    upd(pi, to_f(g[k]), mi, vi);
    p[k] = from_f<T>(pi);
    m[k] = mi;
    v[k] = vi;
  }
}

__global__ void adamw_step_kernel(AdamArgs a, int n_tensors, const float* __restrict__ norm_p) {
  const int t = threadIdx.x;
  if (t < n_tensors && isfinite(*norm_p)) *a.step[t] += 1.f;
}

template <class T>
cudaError_t adamw_launch(void* const* params, const void* const* grads, float* const* m, float* const* v,
                         float* const* steps, const int64_t* numels, int n, const double* lr, const float* norm,
                         float beta1, float beta2, float eps, float wd, float max_norm, cudaStream_t st) {
  AdamArgs a;
  int nt = 0, nb = 0;
  auto flush = [&]() -> cudaError_t {
    if (nb > 0) adamw_kernel<T><<<nb, kThreads, 0, st>>>(a, lr, norm, beta1, beta2, eps, wd, max_norm);
    if (nt > 0) adamw_step_kernel<<<1, kMaxTensors, 0, st>>>(a, nt, norm);
    nt = nb = 0;
    return cudaGetLastError();
  };
  for (int i = 0; i < n; ++i) {
    if (nt == kMaxTensors) {
      if (cudaError_t e = flush()) return e;
    }
    a.p[nt] = params[i];
    a.g[nt] = grads[i];
    a.m[nt] = m[i];
    a.v[nt] = v[i];
    a.step[nt] = steps[i];
    a.n[nt] = numels[i];
    const int64_t chunks = (numels[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      a.tensor[nb] = static_cast<unsigned char>(nt);
      a.chunk[nb] = static_cast<int>(c);
      ++nb;
      if (nb == kMaxBlocks && c + 1 < chunks) {  // tensor continues in the next launch: launch the blocks only
        adamw_kernel<T><<<nb, kThreads, 0, st>>>(a, lr, norm, beta1, beta2, eps, wd, max_norm);
        if (cudaError_t e = cudaGetLastError()) return e;
        nb = 0;
      }
    }
    ++nt;
    if (nb == kMaxBlocks) {
      if (cudaError_t e = flush()) return e;
    }
  }
  return flush();
}

}  // namespace
}  // namespace ng

extern "C" int64_t ng_grad_norm_workspace(const int64_t* numels, int n) {
  int64_t blocks = 0;
  for (int i = 0; i < n; ++i) blocks += (numels[i] + ng::kChunk - 1) / ng::kChunk;
  return blocks < 1 ? 1 : blocks;
}

extern "C" cudaError_t ng_grad_norm(const void* const* grads, const int* dtypes, const int64_t* numels, int n,
                                    double* workspace, float* norm_out, cudaStream_t stream) {
  using namespace ng;
  NormArgs a;
  int nt = 0, nb = 0;
  int64_t done = 0;  // partial sums written so far
  auto launch = [&]() -> cudaError_t {
    if (nb > 0) sumsq_kernel<<<nb, kThreads, 0, stream>>>(a, workspace + done);
    done += nb;
    nb = 0;
    return cudaGetLastError();
  };
  for (int i = 0; i < n; ++i) {
    if (dtypes[i] != NG_F32 && dtypes[i] != NG_BF16 && dtypes[i] != NG_F16) return cudaErrorInvalidValue;
    if (nt == kMaxTensors) {
      if (cudaError_t e = launch()) return e;
      nt = 0;
    }
    a.g[nt] = grads[i];
    a.n[nt] = numels[i];
    a.dtype[nt] = static_cast<unsigned char>(dtypes[i]);
    const int64_t chunks = (numels[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      a.tensor[nb] = static_cast<unsigned char>(nt);
      a.chunk[nb] = static_cast<int>(c);
      if (++nb == kMaxBlocks) {
        if (cudaError_t e = launch()) return e;
      }
    }
    ++nt;
  }
  if (cudaError_t e = launch()) return e;
  if (done == 0) {  // no elements at all: norm 0
    if (cudaError_t e = cudaMemsetAsync(workspace, 0, sizeof(double), stream)) return e;
    done = 1;
  }
  norm_final_kernel<<<1, kThreads, 0, stream>>>(workspace, done, norm_out);
  return cudaGetLastError();
}

extern "C" cudaError_t ng_adamw(void* const* params, const void* const* grads, float* const* exp_avgs,
                                float* const* exp_avg_sqs, float* const* steps, const int64_t* numels, int n,
                                int dtype, const double* lr, const float* norm, float beta1, float beta2, float eps,
                                float weight_decay, float max_grad_norm, cudaStream_t stream) {
#define NG_CALL(T)                                                                                             \
  ng::adamw_launch<T>(params, grads, exp_avgs, exp_avg_sqs, steps, numels, n, lr, norm, beta1, beta2, eps, \
                      weight_decay, max_grad_norm, stream)
  NG_DISPATCH_X(dtype, NG_CALL);
#undef NG_CALL
}
