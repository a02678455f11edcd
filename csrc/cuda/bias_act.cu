// y = act(x + bias), CUDA, torch-free, for the MLP activations: GELU (exact erf and tanh forms) and ReLU^2
// (ACT: the BiasAct codes of csrc/bias_act.cpp); fp32/bf16/fp16 with fp32 math. Forward: elementwise,
// 16-byte loads/stores (VEC = 16 / sizeof(T)) when cols and pointers allow. Backward: one kernel writes dx = dy * act'(x + bias) and, with a bias,
// fp32 partial column sums of dx over fixed row chunks (block: 32 threads x VEC columns, 8 row
// lanes reduced in shared memory in fixed order); a second kernel sums the chunks in order
// (deterministic dbias, no atomics).
#include "common.cuh"

namespace ng {
namespace {

enum : int { kGeluErf = 0, kGeluTanh = 1, kRelu2 = 2 };

template <int ACT>
__device__ __forceinline__ float act(float u) {
  if (ACT == kRelu2) {
    const float r = fmaxf(u, 0.f);
    return r * r;
  }
  return gelu<ACT == kGeluTanh>(u);
}
template <int ACT>
__device__ __forceinline__ float act_grad(float u) {
  if (ACT == kRelu2) return 2.f * fmaxf(u, 0.f);
  return gelu_grad<ACT == kGeluTanh>(u);
}

template <class T, class B, int VEC, int ACT>
__global__ void __launch_bounds__(256) act_fwd_kernel(const T* __restrict__ x, const B* __restrict__ bias,
                                                       T* __restrict__ y, int64_t n_vec, int cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    const int64_t e = i * VEC;
    const int col = static_cast<int>(e % cols);  // VEC divides cols: a vector never straddles rows
    float v[VEC];
    load_f<T, VEC>(x + e, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = act<ACT>(v[k] + (bias ? to_f(bias[col + k]) : 0.f));
    store_f<T, VEC>(y + e, v);
  }
}

template <class T, class B, int VEC, int ACT, bool HAS_BIAS>
__global__ void __launch_bounds__(32 * kRowLanes) act_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                  const B* __restrict__ bias, T* __restrict__ dx,
                                                                  float* __restrict__ partial, int64_t rows, int cols,
                                                                  int64_t chunk_rows) {
  __shared__ float sp[HAS_BIAS ? kRowLanes : 1][HAS_BIAS ? 32 * VEC + 1 : 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int col0 = blockIdx.x * 32 * VEC + tx * VEC;
  const int64_t r0 = blockIdx.y * chunk_rows;
  const int64_t r1 = min(rows, r0 + chunk_rows);
  float acc[VEC], bv[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = bv[k] = 0.f;
  if (col0 < cols) {
    if (HAS_BIAS) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) bv[k] = to_f(bias[col0 + k]);
    }
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      float v[VEC], d[VEC];
      load_f<T, VEC>(x + r * cols + col0, v);
      load_f<T, VEC>(dy + r * cols + col0, d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        d[k] *= act_grad<ACT>(v[k] + bv[k]);
        acc[k] += d[k];  // dbias from the fp32 dx, before rounding to T
      }
      store_f<T, VEC>(dx + r * cols + col0, d);
    }
  }
  if constexpr (HAS_BIAS) {
    write_col_partials<VEC>(sp, acc, partial, cols);
  }
}


inline unsigned grid_for(int64_t n, int threads) {
  int64_t g = (n + threads - 1) / threads;
  const int64_t cap = 65535LL * 8;  // grid-stride beyond this
  return static_cast<unsigned>(g < 1 ? 1 : (g > cap ? cap : g));
}

template <class T, class B, int VEC, int ACT>
void fwd_launch(const void* x, const void* b, void* y, int64_t rows, int cols, cudaStream_t st) {
  const int64_t n_vec = rows * cols / VEC;
  act_fwd_kernel<T, B, VEC, ACT><<<grid_for(n_vec, 256), 256, 0, st>>>(
      static_cast<const T*>(x), static_cast<const B*>(b), static_cast<T*>(y), n_vec, cols);
}

template <class T, class B, int VEC>
void fwd_v(const void* x, const void* b, void* y, int64_t rows, int cols, int act, cudaStream_t st) {
  if (act == kGeluTanh) fwd_launch<T, B, VEC, kGeluTanh>(x, b, y, rows, cols, st);
  else if (act == kRelu2) fwd_launch<T, B, VEC, kRelu2>(x, b, y, rows, cols, st);
  else fwd_launch<T, B, VEC, kGeluErf>(x, b, y, rows, cols, st);
}

template <class T, class B>
cudaError_t fwd(const void* x, const void* b, void* y, int64_t rows, int cols, int act, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  if (cols % V == 0 && aligned16(x) && aligned16(y)) fwd_v<T, B, V>(x, b, y, rows, cols, act, st);
  else fwd_v<T, B, 1>(x, b, y, rows, cols, act, st);
  return cudaGetLastError();
}

template <class T, class B, int VEC, int ACT>
void bwd_launch(const void* dy, const void* x, const void* b, void* dx, float* ws, int64_t rows, int cols,
                int64_t chunk, int64_t nchunks, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((cols + 32 * VEC - 1) / (32 * VEC)), static_cast<unsigned>(nchunks));
  const dim3 block(32, kRowLanes);
  if (b)
    act_bwd_kernel<T, B, VEC, ACT, true><<<grid, block, 0, st>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const B*>(b), static_cast<T*>(dx), ws, rows,
        cols, chunk);
  else
    act_bwd_kernel<T, B, VEC, ACT, false><<<grid, block, 0, st>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), nullptr, static_cast<T*>(dx), nullptr, rows, cols, chunk);
}

template <class T, class B, int VEC>
void bwd_v(const void* dy, const void* x, const void* b, void* dx, float* ws, int64_t rows, int cols, int64_t chunk,
           int64_t nchunks, int act, cudaStream_t st) {
  if (act == kGeluTanh) bwd_launch<T, B, VEC, kGeluTanh>(dy, x, b, dx, ws, rows, cols, chunk, nchunks, st);
  else if (act == kRelu2) bwd_launch<T, B, VEC, kRelu2>(dy, x, b, dx, ws, rows, cols, chunk, nchunks, st);
  else bwd_launch<T, B, VEC, kGeluErf>(dy, x, b, dx, ws, rows, cols, chunk, nchunks, st);
}

template <class T, class B>
cudaError_t bwd(const void* dy, const void* x, const void* b, void* dx, void* db, float* ws, int64_t rows, int cols,
                int act, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  // fixed chunking for the dbias partials; without a bias the same tiling just writes dx
  const int64_t nchunks = colsum_chunks(rows);
  const int64_t chunk = (rows + nchunks - 1) / nchunks;
  if (cols % V == 0 && aligned16(x) && aligned16(dy) && aligned16(dx))
    bwd_v<T, B, V>(dy, x, b, dx, ws, rows, cols, chunk, nchunks, act, st);
  else
    bwd_v<T, B, 1>(dy, x, b, dx, ws, rows, cols, chunk, nchunks, act, st);
  if (b) colsum_final_kernel<B><<<static_cast<unsigned>((cols + 255) / 256), 256, 0, st>>>(ws, nchunks, cols,
                                                                                         static_cast<B*>(db));
  return cudaGetLastError();
}

}  // namespace
}  // namespace ng

extern "C" cudaError_t ng_bias_act_fwd(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, int act,
                                       int x_dtype, int b_dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > (1 << 30)) return cudaErrorInvalidValue;
#define NG_CALL(T, B) ng::fwd<T, B>(x, bias, y, rows, static_cast<int>(cols), act, stream)
  NG_DISPATCH_XP(x_dtype, bias ? b_dtype : x_dtype, NG_CALL);
#undef NG_CALL
}

extern "C" cudaError_t ng_bias_act_bwd(const void* dy, const void* x, const void* bias, void* dx, void* dbias,
                                       float* workspace, int64_t rows, int64_t cols, int act, int x_dtype,
                                       int b_dtype, cudaStream_t stream) {
  if (cols <= 0 || cols > (1 << 30)) return cudaErrorInvalidValue;
  if (rows == 0 && !bias) return cudaSuccess;
#define NG_CALL(T, B) ng::bwd<T, B>(dy, x, bias, dx, dbias, workspace, rows, static_cast<int>(cols), act, stream)
  NG_DISPATCH_XP(x_dtype, bias ? b_dtype : x_dtype, NG_CALL);
#undef NG_CALL
}
