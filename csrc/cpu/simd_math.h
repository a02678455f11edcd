// Per-clone math for the leaf kernels: bf16 <-> fp32, branch-free exp/erf/tanh, GELU and its
// derivative, the ordered column sum over row-chunk partials. No include guard: isa_clones.h
// compiles it into each ISA namespace; include nothing here.

NG_INLINE float ld(const float* p, int64_t i) { return p[i]; }
NG_INLINE float ld(const bf16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
NG_INLINE void st(float* p, int64_t i, float v) { p[i] = v; }
NG_INLINE void st(bf16_t* p, int64_t i, float v) {
  // round to nearest even, NaN stays NaN (same as c10::BFloat16's conversion)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
  r = (v != v) ? 0x7fc00000u : r;
  p[i] = static_cast<bf16_t>(r >> 16);
}

// Row reductions in kLanes-wide steps finished by a tree over the lanes. GCC ends an `omp simd reduction` loop
// with a scalar remainder and then adds the lanes one by one (a 16-long dependency chain on AVX-512): at the
// rows a CPU trains at (LayerNorm's N = 128, attention's T = 64) that was most of each row. The lanes are clobbered.
constexpr int64_t kLanes = 16;  // a multiple of every clone's vector width
NG_INLINE float lanes_sum(float* __restrict a) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    NG_SIMD
    for (int64_t c = 0; c < w; ++c) a[c] += a[c + w];
  }
  return a[0];
}
NG_INLINE float lanes_max(float* __restrict a) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    NG_SIMD
    for (int64_t c = 0; c < w; ++c) a[c] = a[c + w] > a[c] ? a[c + w] : a[c];  // not std::max: blocks vectorizing
  }
  return a[0];
}
// f(j, l) for j < n with l = j % kLanes, the lane f adds j's terms into (lanes of float[kLanes] arrays)
template <class F>
NG_INLINE void over_lanes(int64_t n, F&& f) {
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    NG_SIMD
    for (int64_t l = 0; l < kLanes; ++l) f(j0 + l, l);
  }
  for (int64_t l = 0; j0 + l < n; ++l) f(j0 + l, l);
}
// sum over j < n of f(j)
template <class F>
NG_INLINE float sum_over(int64_t n, F&& f) {
  float lanes[kLanes] = {};
  over_lanes(n, [&](int64_t j, int64_t l) { lanes[l] += f(j); });
  return lanes_sum(lanes);
}
// max over j < n of f(j) (-inf for n = 0)
template <class F>
NG_INLINE float max_over(int64_t n, F&& f) {
  float lanes[kLanes];
  NG_SIMD
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  over_lanes(n, [&](int64_t j, int64_t l) {
    const float v = f(j);
    lanes[l] = v > lanes[l] ? v : lanes[l];
  });
  return lanes_max(lanes);
}

NG_INLINE float as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// exp(x) = 2^n * p for x in [-87.3365, 88.7228]: Cephes-style range reduction + degree-6
// polynomial, ~1 ulp, branch-free; returns p and sets n
NG_INLINE float exp_reduced(float x, int32_t& n_out) {
  // round to nearest with the 1.5*2^23 trick (vectorizes on every ISA, |x*log2e| < 2^22)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  n_out = static_cast<int32_t>(n);
  return p * r * r + r + 1.0f;
}

// exp(x) for float; underflows to 0 (no denormals), also for -inf
NG_INLINE float vexp(float x0) {
  float x = x0 < -87.3365f ? -87.3365f : x0;
  x = x > 88.7228f ? 88.7228f : x;
  int32_t n;
  const float p = exp_reduced(x, n);
  // 2^n split in two factors so n = 128 (x near 88.7) does not overflow the exponent field
  const int32_t h = n >> 1;
  const float r2 = p * as_float((h + 127) << 23) * as_float((n - h + 127) << 23);
  return x0 < -87.3365f ? 0.0f : r2;
}

// exp(x) for x <= 0 (GELU's exp(-x^2) and exp(-2|z|), softmax's s - max): n >= -126, so one 2^n
// factor and no upper clamp (x a few ulp above 0 is fine) -- a quarter faster than vexp on AVX2
NG_INLINE float vexp_nonpos(float x0) {
  const float x = x0 < -87.3365f ? -87.3365f : x0;
  int32_t n;
  const float r2 = exp_reduced(x, n) * as_float((n + 127) << 23);
  return x0 < -87.3365f ? 0.0f : r2;
}

// 1 + erf(x) (= erfc(-x), no cancellation for negative x) and e = exp(-x^2), with
// Abramowitz & Stegun 7.1.26: erfc(|x|) = t*P(t)*exp(-x^2), t = 1/(1 + 0.3275911|x|),
// absolute error < 1.5e-7 -- the approximation ATen's vectorized erf uses. gelu' needs the
// same exp(-x^2), so the backward pays for one exp per element.
NG_INLINE float one_plus_erf(float x, float& e) {
  const float z = fabsf(x);
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float p = 1.061405429f;
  p = p * t + -1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t + -0.284496736f;
  p = p * t + 0.254829592f;
  e = vexp_nonpos(-z * z);
  const float erfc_z = t * p * e;
  return x >= 0.0f ? 2.0f - erfc_z : erfc_z;
}

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1/sqrt(2*pi)
constexpr float kSqrt2_Pi = 0.79788456080286536f;    // sqrt(2/pi)
constexpr float kTanhC = 0.044715f;

// gelu(u) and gelu'(u); exact (erf) form
NG_INLINE float gelu_erf(float u) {
  float e;
  return 0.5f * u * one_plus_erf(u * kSqrt1_2, e);
}
// gelu(u), and gelu'(u) in `grad` from the same erf and exp (the forward that saves the derivative)
NG_INLINE float gelu_erf_and_grad(float u, float& grad) {
  float e;  // exp(-u^2/2)
  const float c = one_plus_erf(u * kSqrt1_2, e);
  grad = 0.5f * c + u * kInvSqrt2Pi * e;
  return 0.5f * u * c;
}
NG_INLINE float gelu_erf_grad(float u) {
  float grad;
  gelu_erf_and_grad(u, grad);
  return grad;
}

// tanh form: with E = exp(-2|z|), 1+tanh(z) and 1-tanh(z)^2 are computed without cancellation
NG_INLINE void tanh_parts(float z, float& one_plus_t, float& one_minus_t2) {
  float e = vexp_nonpos(-2.0f * fabsf(z));
  const float inv = 1.0f / (1.0f + e);
  one_plus_t = z >= 0.0f ? 2.0f * inv : 2.0f * e * inv;
  one_minus_t2 = 4.0f * e * inv * inv;
}
NG_INLINE float gelu_tanh(float u) {
  float opt, omt2;
  tanh_parts(kSqrt2_Pi * (u + kTanhC * u * u * u), opt, omt2);
  return 0.5f * u * opt;
}
NG_INLINE float gelu_tanh_and_grad(float u, float& grad) {
  float opt, omt2;
  tanh_parts(kSqrt2_Pi * (u + kTanhC * u * u * u), opt, omt2);
  float u2 = u * u;
  u2 = u2 < 1e30f ? u2 : 1e30f;  // |u| huge: omt2 is 0, keep 0 * u^2 from becoming NaN
  grad = 0.5f * opt + 0.5f * u * omt2 * kSqrt2_Pi * (1.0f + 3.0f * kTanhC * u2);
  return 0.5f * u * opt;
}
NG_INLINE float gelu_tanh_grad(float u) {
  float grad;
  gelu_tanh_and_grad(u, grad);
  return grad;
}

// out[j] = sum over chunks c of part[c*N + j] for j in [j0, j1), in chunk order (deterministic):
// the dweight/dbias second pass of layer_norm and bias_gelu. The running sum is double: in fp32 its
// rounding grows with the number of chunks (768 at 12288 rows) and made dbias 4.6x PyTorch's error, over budget.
template <class W>
void sum_chunks(const float* __restrict part, int64_t nchunks, int64_t N, W* __restrict out, int64_t j0,
                int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    double s = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) s += part[c * N + j];
    st(out, j, static_cast<float>(s));
  }
}
