// bias + activation leaf kernels (GELU erf / tanh, ReLU^2) on raw pointers, compiled once per ISA clone
// (isa_clones.h). ACT is a BiasAct (bias_act.cpp).
namespace bact {

template <int ACT>
NG_INLINE float act(float u) {
  if (ACT == kRelu2) {
    const float r = u > 0.0f ? u : 0.0f;
    return r * r;
  }
  return ACT == kGeluTanh ? gelu_tanh(u) : gelu_erf(u);
}
template <int ACT>
NG_INLINE float act_grad(float u) {
  if (ACT == kRelu2) return u > 0.0f ? 2.0f * u : 0.0f;
  return ACT == kGeluTanh ? gelu_tanh_grad(u) : gelu_erf_grad(u);
}

// act(u), and act'(u) in `grad`, from one evaluation (GELU only: ReLU^2's backward is cheaper than reading it)
template <int ACT>
NG_INLINE float act_and_grad(float u, float& grad) {
  return ACT == kGeluTanh ? gelu_tanh_and_grad(u, grad) : gelu_erf_and_grad(u, grad);
}

template <class T, class B, int ACT, bool HAS_BIAS>
NG_INLINE void fwd_rows(const T* __restrict x, const B* __restrict b, T* __restrict y, int64_t r0, int64_t r1,
                        int64_t N) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      float u = ld(xr, j);
      if (HAS_BIAS) u += ld(b, j);
      st(yr, j, act<ACT>(u));
    }
  }
}

// dx = dy * grad(r, j) for rows [r0, r1) and (when HAS_BIAS) this chunk's column sums of dx in part[N]: dbias is
// the sum of the fp32 dx (before rounding dx to T), like an fp32 accumulation
template <class T, bool HAS_BIAS, class G>
NG_INLINE void grad_rows(const T* __restrict dy, T* __restrict dx, float* __restrict part, int64_t r0, int64_t r1,
                         int64_t N, G&& grad) {
  if (HAS_BIAS) {
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) part[j] = 0.0f;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * N;
    T* dxr = dx + r * N;
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      const float g = ld(dyr, j) * grad(r, j);
      st(dxr, j, g);
      if (HAS_BIAS) part[j] += g;
    }
  }
}

// the backward evaluating act'(x + b) again
template <class T, class B, int ACT, bool HAS_BIAS>
NG_INLINE void bwd_rows(const T* __restrict dy, const T* __restrict x, const B* __restrict b, T* __restrict dx,
                        float* __restrict part, int64_t r0, int64_t r1, int64_t N) {
  grad_rows<T, HAS_BIAS>(dy, dx, part, r0, r1, N, [&](int64_t r, int64_t j) {
    float u = ld(x, r * N + j);
    if (HAS_BIAS) u += ld(b, j);
    return act_grad<ACT>(u);
  });
}

// y = act(x + b) and d = act'(x + b) in fp32 for rows [r0, r1): the backward is then dx = dy * d (bwd_saved), the
// values bwd_rows computes, without evaluating erf/tanh and exp a second time
template <class T, class B, int ACT, bool HAS_BIAS>
NG_INLINE void fwd_saving_rows(const T* __restrict x, const B* __restrict b, T* __restrict y, float* __restrict d,
                               int64_t r0, int64_t r1, int64_t N) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    float* dr = d + r * N;
    NG_SIMD
    for (int64_t j = 0; j < N; ++j) {
      float u = ld(xr, j);
      if (HAS_BIAS) u += ld(b, j);
      st(yr, j, act_and_grad<ACT>(u, dr[j]));
    }
  }
}

// rows [r0, r1) of y = act(x + b) (b may be null)
template <class T, class B, int ACT>
void fwd_act(const T* x, const B* b, T* y, int64_t r0, int64_t r1, int64_t N) {
  if (b) fwd_rows<T, B, ACT, true>(x, b, y, r0, r1, N);
  else fwd_rows<T, B, ACT, false>(x, b, y, r0, r1, N);
}
template <class T, class B>
void fwd(const T* x, const B* b, T* y, int64_t r0, int64_t r1, int64_t N, int act) {
  if (act == kGeluErf) fwd_act<T, B, kGeluErf>(x, b, y, r0, r1, N);
  else if (act == kGeluTanh) fwd_act<T, B, kGeluTanh>(x, b, y, r0, r1, N);
  else fwd_act<T, B, kRelu2>(x, b, y, r0, r1, N);
}

template <class T, class B, int ACT>
void fwd_saving_act(const T* x, const B* b, T* y, float* d, int64_t r0, int64_t r1, int64_t N) {
  if (b) fwd_saving_rows<T, B, ACT, true>(x, b, y, d, r0, r1, N);
  else fwd_saving_rows<T, B, ACT, false>(x, b, y, d, r0, r1, N);
}
template <class T, class B>
void fwd_saving(const T* x, const B* b, T* y, float* d, int64_t r0, int64_t r1, int64_t N, int act) {
  if (act == kGeluTanh) fwd_saving_act<T, B, kGeluTanh>(x, b, y, d, r0, r1, N);
  else fwd_saving_act<T, B, kGeluErf>(x, b, y, d, r0, r1, N);
}
// dx = dy * d (the forward's saved derivative) for rows [r0, r1), and with part the chunk's column sums of dx
template <class T>
void bwd_saved(const T* dy, const float* d, T* dx, float* part, int64_t r0, int64_t r1, int64_t N) {
  const auto saved = [&](int64_t r, int64_t j) { return d[r * N + j]; };
  if (part) grad_rows<T, true>(dy, dx, part, r0, r1, N, saved);
  else grad_rows<T, false>(dy, dx, part, r0, r1, N, saved);
}

template <class T, class B, int ACT>
void bwd_act(const T* dy, const T* x, const B* b, T* dx, float* part, int64_t r0, int64_t r1, int64_t N) {
  if (b) bwd_rows<T, B, ACT, true>(dy, x, b, dx, part, r0, r1, N);
  else bwd_rows<T, B, ACT, false>(dy, x, b, dx, part, r0, r1, N);
}
template <class T, class B>
void bwd(const T* dy, const T* x, const B* b, T* dx, float* part, int64_t r0, int64_t r1, int64_t N, int act) {
  if (act == kGeluErf) bwd_act<T, B, kGeluErf>(dy, x, b, dx, part, r0, r1, N);
  else if (act == kGeluTanh) bwd_act<T, B, kGeluTanh>(dy, x, b, dx, part, r0, r1, N);
  else bwd_act<T, B, kRelu2>(dy, x, b, dx, part, r0, r1, N);
}

}  // namespace bact
