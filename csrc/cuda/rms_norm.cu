// RMSNorm over the last dim, CUDA, torch-free. Forward: one warp per row, 16-byte loads when cols and
// pointers allow, fp32 sum of squares, saves the fp32 rstd. Backward: dx with one warp per row; dweight as fp32
// partial column sums of dy * x * rstd over fixed row chunks (block tile 32 threads x VEC columns, 8 row lanes
// reduced in shared memory in fixed order) + colsum_final_kernel summing the chunks in order: deterministic, no
// atomics. The weight is optional (w == nullptr: none).
#include "common.cuh"

namespace ng {
namespace {

constexpr int kWarps = 4;  // rows per block in the row kernels

template <class W>
__device__ __forceinline__ float weight_at(const W* w, int j) {
  return w ? to_f(w[j]) : 1.f;
}

template <class T, class W, int VEC>
__global__ void __launch_bounds__(kWarps * 32) rms_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                              T* __restrict__ y, float* __restrict__ rstd,
                                                              int64_t rows, int cols, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * cols;
  float q = 0.f;
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC];
    load_f<T, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q += v[i] * v[i];
  }
  const float rs = rsqrtf(warp_sum(q) / cols + eps);
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC], o[VEC];
    load_f<T, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = v[i] * rs * weight_at(w, j + i);
    store_f<T, VEC>(y + row * cols + j, o);
  }
  if (lane == 0) rstd[row] = rs;
}

// layer_norm.cu's ln_bwd_dx_kernel without the mean: one warp a row, the same prologue over other sums.
template <class T, class W, int VEC>
__global__ void __launch_bounds__(kWarps * 32) rms_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                 const W* __restrict__ w,
                                                                 const float* __restrict__ rstd, T* __restrict__ dx,
                                                                 int64_t rows, int cols) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  const float rs = rstd[row];
  float c = 0.f;
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC], d[VEC];
    load_f<T, VEC>(xr + j, v);
    load_f<T, VEC>(dyr + j, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) c += d[i] * weight_at(w, j + i) * v[i];
  }
  c = warp_sum(c) * rs * rs / cols;  // mean(g * xhat) / rstd: dx = rstd * (g - x * c)
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC], d[VEC], o[VEC];
    load_f<T, VEC>(xr + j, v);
    load_f<T, VEC>(dyr + j, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = rs * (d[i] * weight_at(w, j + i) - v[i] * c);
    store_f<T, VEC>(dx + row * cols + j, o);
  }
}

// partial[chunk][cols]: sums over the chunk's rows of dy * x * rstd
template <class T, int VEC>
__global__ void __launch_bounds__(32 * kRowLanes) rms_bwd_dw_partial_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ rstd, float* __restrict__ partial,
    int64_t rows, int cols, int64_t chunk_rows) {
  __shared__ float sw[kRowLanes][32 * VEC + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int col0 = blockIdx.x * 32 * VEC + tx * VEC;
  const int64_t r0 = blockIdx.y * chunk_rows;
  const int64_t r1 = min(rows, r0 + chunk_rows);
  float aw[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) aw[i] = 0.f;
  if (col0 < cols) {
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      float v[VEC], d[VEC];
      load_f<T, VEC>(x + r * cols + col0, v);
      load_f<T, VEC>(dy + r * cols + col0, d);
      const float rs = rstd[r];
#pragma unroll
      for (int i = 0; i < VEC; ++i) aw[i] += d[i] * v[i] * rs;
    }
  }
  write_col_partials<VEC>(sw, aw, partial, cols);
}

template <class T, class W>
cudaError_t fwd(const void* x, const void* w, void* y, float* rstd, int64_t rows, int cols, float eps,
                cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  const auto* xp = static_cast<const T*>(x);
  const auto* wp = static_cast<const W*>(w);
  if (cols % V == 0 && aligned16(x) && aligned16(y))
    rms_fwd_kernel<T, W, V><<<grid, block, 0, st>>>(xp, wp, static_cast<T*>(y), rstd, rows, cols, eps);
  else
    rms_fwd_kernel<T, W, 1><<<grid, block, 0, st>>>(xp, wp, static_cast<T*>(y), rstd, rows, cols, eps);
  return cudaGetLastError();
}

template <class T, class W>
cudaError_t bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx, void* dw, float* ws,
                int64_t rows, int cols, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const auto* dyp = static_cast<const T*>(dy);
  const auto* xp = static_cast<const T*>(x);
  const auto* wp = static_cast<const W*>(w);
  if (rows > 0) {
    const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
    if (cols % V == 0 && aligned16(x) && aligned16(dy) && aligned16(dx))
      rms_bwd_dx_kernel<T, W, V><<<grid, block, 0, st>>>(dyp, xp, wp, rstd, static_cast<T*>(dx), rows, cols);
    else
      rms_bwd_dx_kernel<T, W, 1><<<grid, block, 0, st>>>(dyp, xp, wp, rstd, static_cast<T*>(dx), rows, cols);
  }
  if (w == nullptr) return cudaGetLastError();
  const int64_t nchunks = colsum_chunks(rows);
  const int64_t chunk = (rows + nchunks - 1) / nchunks;
  const dim3 block(32, kRowLanes);
  if (cols % 4 == 0 && aligned_to(x, 4 * sizeof(T)) && aligned_to(dy, 4 * sizeof(T)))  // Vec<T, 4> loads
    rms_bwd_dw_partial_kernel<T, 4><<<dim3((cols + 127) / 128, static_cast<unsigned>(nchunks)), block, 0, st>>>(
        dyp, xp, rstd, ws, rows, cols, chunk);
  else
    rms_bwd_dw_partial_kernel<T, 1><<<dim3((cols + 31) / 32, static_cast<unsigned>(nchunks)), block, 0, st>>>(
        dyp, xp, rstd, ws, rows, cols, chunk);
  colsum_final_kernel<W><<<static_cast<unsigned>((cols + 255) / 256), 256, 0, st>>>(ws, nchunks, cols,
                                                                                   static_cast<W*>(dw));
  return cudaGetLastError();
}

}  // namespace
}  // namespace ng

extern "C" cudaError_t ng_rms_norm_fwd(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                                       int64_t cols, float eps, int x_dtype, int w_dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > (1 << 30)) return cudaErrorInvalidValue;
#define NG_CALL(T, W) ng::fwd<T, W>(x, w, y, rstd, rows, static_cast<int>(cols), eps, stream)
  NG_DISPATCH_XP(x_dtype, w_dtype, NG_CALL);
#undef NG_CALL
}

extern "C" cudaError_t ng_rms_norm_bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                                       void* dw, float* workspace, int64_t rows, int64_t cols, int x_dtype,
                                       int w_dtype, cudaStream_t stream) {
  if (cols <= 0 || cols > (1 << 30)) return cudaErrorInvalidValue;
#define NG_CALL(T, W) ng::bwd<T, W>(dy, x, w, rstd, dx, dw, workspace, rows, static_cast<int>(cols), stream)
  NG_DISPATCH_XP(x_dtype, w_dtype, NG_CALL);
#undef NG_CALL
}
