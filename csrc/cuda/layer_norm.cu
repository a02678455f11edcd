// LayerNorm over the last dim, CUDA, torch-free. Forward: one warp per row, 16-byte loads when
// cols and pointers allow, fp32 two-pass statistics (mean, then centered variance: no
// cancellation), saves fp32 mean/rstd. Backward: dx with one warp per row; dweight/dbias as
// fp32 partial column sums over fixed row chunks (block tile 32 threads x VEC columns, 8 row
// lanes reduced in shared memory in fixed order) + a second kernel summing the chunks in
// order: deterministic, no atomics.
#include "common.cuh"

namespace ng {
namespace {

constexpr int kWarps = 4;  // rows per block in the row kernels

template <class T, class W, int VEC>
__global__ void __launch_bounds__(kWarps * 32) ln_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                             const W* __restrict__ b, T* __restrict__ y,
                                                             float* __restrict__ mean, float* __restrict__ rstd,
                                                             int64_t rows, int cols, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float s = 0.f;
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC];
    load_f<T, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += v[i];
  }
  const float mu = warp_sum(s) / cols;
  float q = 0.f;
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC];
    load_f<T, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q += (v[i] - mu) * (v[i] - mu);
  }
  const float rs = rsqrtf(warp_sum(q) / cols + eps);
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC], wv[VEC], o[VEC];
    load_f<T, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) wv[i] = to_f(w[j + i]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = (v[i] - mu) * rs * wv[i] + (b ? to_f(b[j + i]) : 0.f);
    store_f<T, VEC>(yr + j, o);
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

template <class T, class W, int VEC>
__global__ void __launch_bounds__(kWarps * 32) ln_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                                const W* __restrict__ w,
                                                                const float* __restrict__ mean,
                                                                const float* __restrict__ rstd, T* __restrict__ dx,
                                                                int64_t rows, int cols) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  const float mu = mean[row], rs = rstd[row];
  float a = 0.f, c = 0.f;
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC], d[VEC];
    load_f<T, VEC>(xr + j, v);
    load_f<T, VEC>(dyr + j, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float g = d[i] * to_f(w[j + i]);
      a += g;
      c += g * (v[i] - mu) * rs;
    }
  }
  a = warp_sum(a) / cols;
  c = warp_sum(c) / cols;
  for (int j = lane * VEC; j < cols; j += 32 * VEC) {
    float v[VEC], d[VEC], o[VEC];
    load_f<T, VEC>(xr + j, v);
    load_f<T, VEC>(dyr + j, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = rs * (d[i] * to_f(w[j + i]) - a - (v[i] - mu) * rs * c);
    store_f<T, VEC>(dx + row * cols + j, o);
  }
}

// partial[2][chunk][cols]: sums over the chunk's rows of dy*xhat and dy
template <class T, int VEC>
__global__ void __launch_bounds__(32 * kRowLanes) ln_bwd_dwdb_partial_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ rstd, float* __restrict__ partial, int64_t rows, int cols, int64_t chunk_rows,
    int64_t nchunks) {
  __shared__ float sw[kRowLanes][32 * VEC + 1];
  __shared__ float sb[kRowLanes][32 * VEC + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int col0 = blockIdx.x * 32 * VEC + tx * VEC;
  const int64_t r0 = blockIdx.y * chunk_rows;
  const int64_t r1 = min(rows, r0 + chunk_rows);
  float aw[VEC], ab[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) aw[i] = ab[i] = 0.f;
  if (col0 < cols) {
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      float v[VEC], d[VEC];
      load_f<T, VEC>(x + r * cols + col0, v);
      load_f<T, VEC>(dy + r * cols + col0, d);
      const float mu = mean[r], rs = rstd[r];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        aw[i] += d[i] * (v[i] - mu) * rs;
        ab[i] += d[i];
      }
    }
  }
  write_col_partials<VEC>(sw, aw, partial, cols);
  write_col_partials<VEC>(sb, ab, partial + nchunks * static_cast<int64_t>(cols), cols);
}


template <class T, class W>
cudaError_t fwd(const void* x, const void* w, const void* b, void* y, float* mean, float* rstd, int64_t rows,
                int cols, float eps, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  const bool vec = cols % V == 0 && aligned16(x) && aligned16(y);
  if (vec)
    ln_fwd_kernel<T, W, V><<<grid, block, 0, st>>>(static_cast<const T*>(x), static_cast<const W*>(w),
                                                     static_cast<const W*>(b), static_cast<T*>(y), mean, rstd, rows,
                                                     cols, eps);
  else
    ln_fwd_kernel<T, W, 1><<<grid, block, 0, st>>>(static_cast<const T*>(x), static_cast<const W*>(w),
                                                     static_cast<const W*>(b), static_cast<T*>(y), mean, rstd, rows,
                                                     cols, eps);
  return cudaGetLastError();
}

template <class T, int VEC>
void launch_partial(const void* dy, const void* x, const float* mean, const float* rstd, float* ws, int64_t rows,
                    int cols, int64_t chunk, int64_t nchunks, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((cols + 32 * VEC - 1) / (32 * VEC)), static_cast<unsigned>(nchunks));
  ln_bwd_dwdb_partial_kernel<T, VEC><<<grid, dim3(32, kRowLanes), 0, st>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, ws, rows, cols, chunk, nchunks);
}

template <class T, class W>
cudaError_t bwd(const void* dy, const void* x, const void* w, const float* mean, const float* rstd, void* dx,
                void* dw, void* db, float* ws, int64_t rows, int cols, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = cols % V == 0 && aligned16(x) && aligned16(dy) && aligned16(dx);
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  if (rows > 0) {
    if (vec)
      ln_bwd_dx_kernel<T, W, V><<<grid, block, 0, st>>>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                          static_cast<const W*>(w), mean, rstd, static_cast<T*>(dx),
                                                          rows, cols);
    else
      ln_bwd_dx_kernel<T, W, 1><<<grid, block, 0, st>>>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                          static_cast<const W*>(w), mean, rstd, static_cast<T*>(dx),
                                                          rows, cols);
  }
  const int64_t nchunks = colsum_chunks(rows);
  const int64_t chunk = (rows + nchunks - 1) / nchunks;
  // 4 columns per thread for the partials (2 x 8-byte bf16 loads / one 16-byte fp32 load)
  if (cols % 4 == 0 && aligned_to(x, 4 * sizeof(T)) && aligned_to(dy, 4 * sizeof(T)))  // Vec<T, 4> loads
    launch_partial<T, 4>(dy, x, mean, rstd, ws, rows, cols, chunk, nchunks, st);
  else
    launch_partial<T, 1>(dy, x, mean, rstd, ws, rows, cols, chunk, nchunks, st);
  const unsigned g = static_cast<unsigned>((cols + 255) / 256);
  colsum_final_kernel<W><<<g, 256, 0, st>>>(ws, nchunks, cols, static_cast<W*>(dw));
  colsum_final_kernel<W><<<g, 256, 0, st>>>(ws + nchunks * cols, nchunks, cols, static_cast<W*>(db));
  return cudaGetLastError();
}

}  // namespace
}  // namespace ng

extern "C" int64_t ng_colsum_chunks(int64_t rows) { return ng::colsum_chunks(rows); }

extern "C" cudaError_t ng_layer_norm_fwd(const void* x, const void* w, const void* b, void* y, float* mean,
                                         float* rstd, int64_t rows, int64_t cols, float eps, int x_dtype,
                                         int w_dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > (1 << 30)) return cudaErrorInvalidValue;
#define NG_CALL(T, W) ng::fwd<T, W>(x, w, b, y, mean, rstd, rows, static_cast<int>(cols), eps, stream)
  NG_DISPATCH_XP(x_dtype, w_dtype, NG_CALL);
#undef NG_CALL
}

extern "C" cudaError_t ng_layer_norm_bwd(const void* dy, const void* x, const void* w, const float* mean,
                                         const float* rstd, void* dx, void* dw, void* db, float* workspace,
                                         int64_t rows, int64_t cols, int x_dtype, int w_dtype, cudaStream_t stream) {
  if (cols <= 0 || cols > (1 << 30)) return cudaErrorInvalidValue;
#define NG_CALL(T, W) ng::bwd<T, W>(dy, x, w, mean, rstd, dx, dw, db, workspace, rows, static_cast<int>(cols), stream)
  NG_DISPATCH_XP(x_dtype, w_dtype, NG_CALL);
#undef NG_CALL
}
