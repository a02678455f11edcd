// Linear + cross-entropy leaf kernel on raw pointers, compiled once per ISA clone (isa_clones.h): the fused
// softmax / loss / gradient pass over rows of logits that the op's glue gets from at::mm, chunk by chunk.
namespace lce {

// tanh for the softcap (Cephes tanhf): an odd polynomial below |u| = 0.625, so small logits keep their
// relative precision (1 - 2/(e^2u + 1) would cancel there), 1 - 2/(e^2|u| + 1) above.
NG_INLINE float tanh_f(float u) {
  const float a = std::fabs(u), z = u * u;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * u + u;
  const float big = 1.0f - 2.0f / (vexp(2.0f * a) + 1.0f);
  return a < 0.625f ? small : (u < 0.0f ? -big : big);
}

// One row l[V] of logits (T) with target t: returns lse(z) - z[t], z = l or cap * tanh(l / cap), kept in the
// fp32 scratch z[V]. GRAD: l <- d loss / d l, the target's -1 added in fp32 before rounding to T.
template <class T, bool CAP, bool GRAD>
NG_INLINE float row(T* __restrict l, float* __restrict z, int64_t V, int64_t t, float cap) {
  const float inv_cap = CAP ? 1.0f / cap : 0.0f;
  const float m = max_over(V, [&](int64_t j) {
    z[j] = CAP ? cap * tanh_f(ld(l, j) * inv_cap) : ld(l, j);
    return z[j];
  });
  const float s = sum_over(V, [&](int64_t j) { return vexp_nonpos(z[j] - m); });
  const float lse = m + std::log(s);
  if (GRAD) {
    NG_SIMD
    for (int64_t j = 0; j < V; ++j) {
      const float u = z[j] * inv_cap;
      st(l, j, vexp_nonpos(z[j] - lse) * (CAP ? 1.0f - u * u : 1.0f));  // z <= lse (to a few ulp)
    }
    const float u = z[t] * inv_cap;
    st(l, t, (vexp_nonpos(z[t] - lse) - 1.0f) * (CAP ? 1.0f - u * u : 1.0f));
  }
  return lse - z[t];
}

// rows [r0, r1) of the (rows, V) logits: loss[r] (0 for ignored rows); with grad, the logits become the
// gradient (0 on ignored rows). z: fp32 scratch of V.
template <class T>
void rows(T* logits, const int64_t* tgt, float* loss, float* z, int64_t r0, int64_t r1, int64_t V,
          int64_t ignore_index, float cap, bool grad) {
  for (int64_t r = r0; r < r1; ++r) {
    T* l = logits + r * V;
    if (tgt[r] == ignore_index) {
      loss[r] = 0.0f;
      if (grad) std::memset(l, 0, V * sizeof(T));  // +0.0 is all-zero bits in fp32 and bf16
      continue;
    }
    const int64_t t = tgt[r];
    loss[r] = cap > 0.0f ? (grad ? row<T, true, true>(l, z, V, t, cap) : row<T, true, false>(l, z, V, t, cap))
                         : (grad ? row<T, false, true>(l, z, V, t, cap) : row<T, false, false>(l, z, V, t, cap));
  }
}

}  // namespace lce
