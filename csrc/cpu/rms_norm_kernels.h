// RMSNorm leaf kernels on raw pointers, compiled once per ISA clone (isa_clones.h). x and dx in T, y and dy in
// Y (as layer_norm_kernels.h).
namespace rn {

// layer_norm_kernels.h's row loops without the mean (and with an optional weight): the same shape, other sums.
template <class T, class W, class Y, bool HAS_W>
NG_INLINE void fwd_rows(const T* __restrict x, const W* __restrict w, Y* __restrict y, float* rstd, int64_t r0,
                        int64_t r1, int64_t N, float eps) {
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    Y* yr = y + r * N;
    const float s = sum_over(N, [&](int64_t j) { return ld(xr, j) * ld(xr, j); });
    const float rs = 1.0f / sqrtf(s * inv_n + eps);
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) st(yr, j, HAS_W ? ld(xr, j) * rs * ld(w, j) : ld(xr, j) * rs);
    rstd[r] = rs;
  }
}

// rows [r0, r1): y and rstd (w may be null: no weight)
template <class T, class W, class Y>
void fwd(const T* x, const W* w, Y* y, float* rstd, int64_t r0, int64_t r1, int64_t N, float eps) {
  if (w)
    fwd_rows<T, W, Y, true>(x, w, y, rstd, r0, r1, N, eps);
  else
    fwd_rows<T, W, Y, false>(x, w, y, rstd, r0, r1, N, eps);
}

template <class T, class W, class Y, bool HAS_W>
NG_INLINE void bwd_rows(const Y* __restrict dy, const T* __restrict x, const W* __restrict w,
                        const float* __restrict rstd, T* __restrict dx, float* __restrict dw_part, int64_t r0,
                        int64_t r1, int64_t N) {
  const float inv_n = 1.0f / static_cast<float>(N);
  if (HAS_W) {
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) dw_part[j] = 0.0f;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    const Y* dyr = dy + r * N;
    T* dxr = dx + r * N;
    const float rs = rstd[r];
    const float c = sum_over(N, [&](int64_t j) { return (HAS_W ? ld(dyr, j) * ld(w, j) : ld(dyr, j)) * ld(xr, j); }) *
                    (rs * rs * inv_n);  // mean(g * xhat) / rstd, so that dx = rstd * (g - x * c)
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      const float d = ld(dyr, j), xv = ld(xr, j);
      st(dxr, j, rs * ((HAS_W ? d * ld(w, j) : d) - xv * c));
      if (HAS_W) dw_part[j] += d * xv * rs;
    }
  }
}

// dx for rows [r0, r1) and, with a weight, this chunk's partial sums of dy * xhat (dw_part)
template <class T, class W, class Y>
void bwd(const Y* dy, const T* x, const W* w, const float* rstd, T* dx, float* dw_part, int64_t r0, int64_t r1,
         int64_t N) {
  if (w)
    bwd_rows<T, W, Y, true>(dy, x, w, rstd, dx, dw_part, r0, r1, N);
  else
    bwd_rows<T, W, Y, false>(dy, x, w, rstd, dx, dw_part, r0, r1, N);
}

}  // namespace rn
