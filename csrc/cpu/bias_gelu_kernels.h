// bias + GELU leaf kernels on raw pointers, compiled once per ISA clone (isa_clones.h).
namespace bg {

template <bool TANH>
NG_INLINE float act(float u) {
  return TANH ? gelu_tanh(u) : gelu_erf(u);
}
template <bool TANH>
NG_INLINE float act_grad(float u) {
  return TANH ? gelu_tanh_grad(u) : gelu_erf_grad(u);
}

template <class T, class B, bool TANH, bool HAS_BIAS>
NG_INLINE void fwd_rows(const T* __restrict x, const B* __restrict b, T* __restrict y, int64_t r0, int64_t r1,
                        int64_t N) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      float u = ld(xr, j);
      if (HAS_BIAS) u += ld(b, j);
      st(yr, j, act<TANH>(u));
    }
  }
}

// The backward's row loop is the forward's with gelu' in place of gelu, times dy (and dbias's column sums).
// dx for rows [r0, r1) and (when HAS_BIAS) this chunk's column sums of dx in part[N]
template <class T, class B, bool TANH, bool HAS_BIAS>
NG_INLINE void bwd_rows(const T* __restrict dy, const T* __restrict x, const B* __restrict b, T* __restrict dx,
                        float* __restrict part, int64_t r0, int64_t r1, int64_t N) {
  if (HAS_BIAS) {
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) part[j] = 0.0f;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    const T* dyr = dy + r * N;
    T* dxr = dx + r * N;
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      float u = ld(xr, j);
      if (HAS_BIAS) u += ld(b, j);
      const float g = ld(dyr, j) * act_grad<TANH>(u);
      st(dxr, j, g);
      // dbias is the sum of the fp32 dx (before rounding dx to T), like an fp32 accumulation
      if (HAS_BIAS) part[j] += g;
    }
  }
}

// rows [r0, r1) of y = gelu(x + b) (b may be null)
template <class T, class B>
void fwd(const T* x, const B* b, T* y, int64_t r0, int64_t r1, int64_t N, bool tanh) {
  if (tanh) {
    if (b) fwd_rows<T, B, true, true>(x, b, y, r0, r1, N);
    else fwd_rows<T, B, true, false>(x, b, y, r0, r1, N);
  } else {
    if (b) fwd_rows<T, B, false, true>(x, b, y, r0, r1, N);
    else fwd_rows<T, B, false, false>(x, b, y, r0, r1, N);
  }
}

template <class T, class B>
void bwd(const T* dy, const T* x, const B* b, T* dx, float* part, int64_t r0, int64_t r1, int64_t N, bool tanh) {
  if (tanh) {
    if (b) bwd_rows<T, B, true, true>(dy, x, b, dx, part, r0, r1, N);
    else bwd_rows<T, B, true, false>(dy, x, b, dx, part, r0, r1, N);
  } else {
    if (b) bwd_rows<T, B, false, true>(dy, x, b, dx, part, r0, r1, N);
    else bwd_rows<T, B, false, false>(dy, x, b, dx, part, r0, r1, N);
  }
}

}  // namespace bg
