// Rotary-embedding leaf kernel on raw pointers, compiled once per ISA clone (isa_clones.h).
namespace rp {

// rows [r0, r1) of x (rows = (b, h, t) positions at strides sb, sh, stt; contiguous last dim of 2 * half) into
// the contiguous o: o = cat(x1 cos - x2 sin', x2 cos + x1 sin') with sin' = sign * sin (-1: the inverse turn)
template <class T>
void rotate(const T* __restrict x, T* __restrict o, const float* __restrict cos, const float* __restrict sin,
            int64_t r0, int64_t r1, int64_t H, int64_t T_, int64_t sb, int64_t sh, int64_t stt, int64_t half,
            float sign) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r % T_, bh = r / T_;
    const T* xr = x + (bh / H) * sb + (bh % H) * sh + t * stt;
    T* orow = o + r * 2 * half;
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    NG_SIMD
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = ld(xr, j), x2 = ld(xr, j + half), sj = sign * s[j];
      st(orow, j, x1 * c[j] - x2 * sj);
      st(orow, j + half, x2 * c[j] + x1 * sj);
    }
  }
}

}  // namespace rp
