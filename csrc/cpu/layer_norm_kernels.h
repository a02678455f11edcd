// LayerNorm leaf kernels on raw pointers, compiled once per ISA clone (isa_clones.h). x and dx in T, y and dy
// in Y: T, or bf16 for an fp32 x (the output dtype autocast's next matmul takes).
namespace ln {

template <class T, class W, class Y, bool HAS_BIAS>
NG_INLINE void fwd_rows(const T* __restrict x, const W* __restrict w, const W* __restrict b, Y* __restrict y,
                        float* mean, float* rstd, int64_t r0, int64_t r1, int64_t N, float eps) {
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    Y* yr = y + r * N;
    const float mu = sum_over(N, [&](int64_t j) { return ld(xr, j); }) * inv_n;
    const float v = sum_over(N, [&](int64_t j) {
      const float d = ld(xr, j) - mu;
      return d * d;
    });
    const float rs = 1.0f / sqrtf(v * inv_n + eps);
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      float o = (ld(xr, j) - mu) * rs * ld(w, j);
      if (HAS_BIAS) o += ld(b, j);
      st(yr, j, o);
    }
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// rows [r0, r1): y, mean, rstd (b may be null)
template <class T, class W, class Y>
void fwd(const T* x, const W* w, const W* b, Y* y, float* mean, float* rstd, int64_t r0, int64_t r1, int64_t N,
         float eps) {
  if (b)
    fwd_rows<T, W, Y, true>(x, w, b, y, mean, rstd, r0, r1, N, eps);
  else
    fwd_rows<T, W, Y, false>(x, w, b, y, mean, rstd, r0, r1, N, eps);
}

// dx for rows [r0, r1) and this chunk's partial sums of dy*xhat (dw_part) and dy (db_part)
template <class T, class W, class Y>
void bwd(const Y* __restrict dy, const T* __restrict x, const W* __restrict w, const float* __restrict mean,
         const float* __restrict rstd, T* __restrict dx, float* __restrict dw_part, float* __restrict db_part,
         int64_t r0, int64_t r1, int64_t N) {
  const float inv_n = 1.0f / static_cast<float>(N);
  NG_SIMD
  for (int64_t j = 0; j < N; ++j) {
    dw_part[j] = 0.0f;
    db_part[j] = 0.0f;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    const Y* dyr = dy + r * N;
    T* dxr = dx + r * N;
    const float mu = mean[r], rs = rstd[r];
    float as[kLanes] = {}, cs[kLanes] = {};
    over_lanes(N, [&](int64_t j, int64_t l) {
      const float xh = (ld(xr, j) - mu) * rs;
      const float g = ld(dyr, j) * ld(w, j);
      as[l] += g;
      cs[l] += g * xh;
    });
    const float a = lanes_sum(as) * inv_n, c = lanes_sum(cs) * inv_n;
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      const float xh = (ld(xr, j) - mu) * rs;
      const float d = ld(dyr, j);
      st(dxr, j, rs * (d * ld(w, j) - a - xh * c));
      dw_part[j] += d * xh;
      db_part[j] += d;
    }
  }
}

// add_layer_norm's residual add: s = x + r for rows [r0, r1) (fp32 math, s in x's dtype: torch's x + r)
template <class T, class R>
void add_rows(const T* __restrict x, const R* __restrict r, T* __restrict s, int64_t r0, int64_t r1, int64_t N) {
  NG_SIMD
  for (int64_t i = r0 * N; i < r1 * N; ++i) st(s, i, ld(x, i) + ld(r, i));
}

// its backward, after LayerNorm's wrote dx for these rows: dx += ds (s's gradient from its other uses; null:
// none), and dr = dx in r's dtype (the rounding autograd's sum and cast would do)
template <class T, class R>
void add_rows_bwd(T* __restrict dx, const T* __restrict ds, R* __restrict dr, int64_t r0, int64_t r1, int64_t N) {
  if (ds) {
    NG_SIMD
    for (int64_t i = r0 * N; i < r1 * N; ++i) st(dx, i, ld(dx, i) + ld(ds, i));
  }
  NG_SIMD
  for (int64_t i = r0 * N; i < r1 * N; ++i) st(dr, i, ld(dx, i));
}

}  // namespace ln
