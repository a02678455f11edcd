// Device helpers shared by the .cu files: dtype conversion, 16-byte vectors, warp/block sums, and the
// launchers' (activation, parameter) dtype dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace ng {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// N elements of T in one aligned load/store (N * sizeof(T) = 16 bytes for the fast paths)
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <class T, int N>
__device__ __forceinline__ void load_f(const T* p, float (&out)[N]) {
  const Vec<T, N> r = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f(r.v[i]);
}
template <class T, int N>
__device__ __forceinline__ void store_f(T* p, const float (&in)[N]) {
  Vec<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// p is a multiple of `bytes` (a power of 2), as a Vec<T, N> of that size needs
inline bool aligned_to(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }
inline bool aligned16(const void* p) { return aligned_to(p, 16); }

inline int64_t colsum_chunks(int64_t rows) {
  // at most 256 chunks of at least 32 rows
  int64_t c = (rows + 31) / 32;
  return c < 1 ? 1 : (c > 256 ? 256 : c);
}

// The column-partial kernels (dweight, dbias): a block of 32 x kRowLanes threads covers 32 * VEC columns of one
// row chunk, each row lane ty summing rows r0 + ty, r0 + ty + kRowLanes, ... into acc[VEC] (fp32). This sums
// the lanes in fixed order through shared memory `lanes` and writes the chunk's row `blockIdx.y` of `partial`
// [chunks][cols]: deterministic, no atomics. Every thread of the block must call it.
constexpr int kRowLanes = 8;
template <int VEC>
__device__ __forceinline__ void write_col_partials(float (*lanes)[32 * VEC + 1], const float (&acc)[VEC],
                                                   float* __restrict__ partial, int cols) {
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int k = 0; k < VEC; ++k) lanes[ty][tx * VEC + k] = acc[k];
  __syncthreads();
  for (int k = ty * 32 + tx; k < 32 * VEC; k += 32 * kRowLanes) {  // thread (tx, ty) finishes some columns
    const int col = blockIdx.x * 32 * VEC + k;
    if (col < cols) {
      float s = 0.f;
#pragma unroll
      for (int l = 0; l < kRowLanes; ++l) s += lanes[l][k];
      partial[blockIdx.y * static_cast<int64_t>(cols) + col] = s;
    }
  }
}

// out[j] = sum over chunks of partial[c][j], in chunk order (deterministic); out may be null (nothing to do)
template <class W>
__global__ void colsum_final_kernel(const float* __restrict__ partial, int64_t nchunks, int cols, W* __restrict__ out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= cols || out == nullptr) return;
  double s = 0.0;  // fp32 here put dbias over budget at GPT-2's 12288 rows (256 chunks; measured on an H200)
  for (int64_t c = 0; c < nchunks; ++c) s += partial[c * cols + j];
  out[j] = from_f<W>(static_cast<float>(s));
}

// GELU (exact erf / tanh) and its derivative, fp32
constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2_Pi = 0.79788456080286536f;
constexpr float kTanhC = 0.044715f;

template <bool TANH>
__device__ __forceinline__ float gelu(float u) {
  if (TANH) return 0.5f * u * (1.0f + tanhf(kSqrt2_Pi * (u + kTanhC * u * u * u)));
  return 0.5f * u * erfcf(-u * kSqrt1_2);
}
template <bool TANH>
__device__ __forceinline__ float gelu_grad(float u) {
  if (TANH) {
    const float t = tanhf(kSqrt2_Pi * (u + kTanhC * u * u * u));
    const float u2 = fminf(u * u, 1e30f);
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kSqrt2_Pi * (1.0f + 3.0f * kTanhC * u2);
  }
  return 0.5f * erfcf(-u * kSqrt1_2) + u * kInvSqrt2Pi * expf(-0.5f * u * u);
}

}  // namespace ng

// Dispatches a launcher on (activation dtype XD, parameter dtype PD): CALL(T, P) with the
// activations in T and the weight/bias in P (T or float32); other pairs are invalid.
#define NG_DISPATCH_XP(XD, PD, CALL)                                                  \
  do {                                                                                \
    if ((XD) == NG_F32 && (PD) == NG_F32) return CALL(float, float);                  \
    if ((XD) == NG_BF16 && (PD) == NG_BF16) return CALL(__nv_bfloat16, __nv_bfloat16); \
    if ((XD) == NG_BF16 && (PD) == NG_F32) return CALL(__nv_bfloat16, float);         \
    if ((XD) == NG_F16 && (PD) == NG_F16) return CALL(__half, __half);                \
    if ((XD) == NG_F16 && (PD) == NG_F32) return CALL(__half, float);                 \
    return cudaErrorInvalidValue;                                                     \
  } while (0)

// Dispatches a launcher on one dtype XD (every tensor of the op in it): CALL(T); other codes are invalid.
#define NG_DISPATCH_X(XD, CALL)                         \
  do {                                                  \
    if ((XD) == NG_F32) return CALL(float);             \
    if ((XD) == NG_BF16) return CALL(__nv_bfloat16);    \
    if ((XD) == NG_F16) return CALL(__half);            \
    return cudaErrorInvalidValue;                       \
  } while (0)
