// AdamW leaf kernels on raw pointers, compiled once per ISA clone (isa_clones.h); AdamHyper
// (one tensor's step scalars) is defined by adamw.cpp, outside the clones.
namespace adam {

// fp64 accumulation (the loop is memory-bound, so it costs nothing and keeps 1e-7 accuracy)
template <class T>
double sumsq(const T* __restrict g, int64_t n) {
  double s = 0.0;
  NG_SIMD_SUM(s)
  for (int64_t i = 0; i < n; ++i) {
    const double v = ld(g, i);
    s += v * v;
  }
  return s;
}

template <class T>
void update(T* __restrict p, const T* __restrict g, float* __restrict m, float* __restrict v, int64_t n,
            const AdamHyper& h) {
  const float clip = h.clip, decay = h.decay, w1 = h.w1, beta2 = h.beta2, w2 = h.w2;
  const float nss = h.neg_step_size, bc2s = h.bc2_sqrt, eps = h.eps;
  NG_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const float gi = ld(g, i) * clip;
    const float pi = ld(p, i) * decay;
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * beta2 + w2 * gi * gi;
    const float denom = sqrtf(vi) / bc2s + eps;
    m[i] = mi;
    v[i] = vi;
    st(p, i, pi + (nss * mi) / denom);
  }
}

}  // namespace adam
