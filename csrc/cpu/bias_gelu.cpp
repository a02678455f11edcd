// y = gelu(x + bias) over the last dimension, CPU, exact (erf) and tanh forms; backward gives
// dx = dy * gelu'(x + bias) and dbias = column sums of dx (fixed row chunks -> fp32 partials
// -> ordered sum, so deterministic). x in {fp32, bf16}; bias in {x's dtype, fp32}; fp32 math.
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace nanogpt_cpu {
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

#define NG_BG_LEAVES(SUF, T, B)                                                                                    \
  NG_CLONES void fwd_##SUF(const T* x, const B* b, T* y, int64_t r0, int64_t r1, int64_t N, bool tanh) {          \
    if (tanh) {                                                                                                   \
      if (b) fwd_rows<T, B, true, true>(x, b, y, r0, r1, N);                                                      \
      else fwd_rows<T, B, true, false>(x, b, y, r0, r1, N);                                                       \
    } else {                                                                                                      \
      if (b) fwd_rows<T, B, false, true>(x, b, y, r0, r1, N);                                                     \
      else fwd_rows<T, B, false, false>(x, b, y, r0, r1, N);                                                      \
    }                                                                                                             \
  }                                                                                                               \
  NG_CLONES void bwd_##SUF(const T* dy, const T* x, const B* b, T* dx, float* part, int64_t r0, int64_t r1,        \
                           int64_t N, bool tanh) {                                                                \
    if (tanh) {                                                                                                   \
      if (b) bwd_rows<T, B, true, true>(dy, x, b, dx, part, r0, r1, N);                                           \
      else bwd_rows<T, B, true, false>(dy, x, b, dx, part, r0, r1, N);                                            \
    } else {                                                                                                      \
      if (b) bwd_rows<T, B, false, true>(dy, x, b, dx, part, r0, r1, N);                                          \
      else bwd_rows<T, B, false, false>(dy, x, b, dx, part, r0, r1, N);                                           \
    }                                                                                                             \
  }
NG_BG_LEAVES(f32_f32, float, float)
NG_BG_LEAVES(bf16_bf16, bf16_t, bf16_t)
NG_BG_LEAVES(bf16_f32, bf16_t, float)
#undef NG_BG_LEAVES

enum class Combo { F32_F32, BF16_BF16, BF16_F32 };

Combo combo_of(at::ScalarType xt, at::ScalarType bt, const char* op) {
  if (xt == at::kFloat && bt == at::kFloat) return Combo::F32_F32;
  if (xt == at::kBFloat16 && bt == at::kBFloat16) return Combo::BF16_BF16;
  if (xt == at::kBFloat16 && bt == at::kFloat) return Combo::BF16_F32;
  TORCH_CHECK(false, op, ": unsupported dtypes x=", xt, " bias=", bt,
              " (CPU kernels take x in float32/bfloat16 and bias in x's dtype or float32)");
}

struct Args {
  at::Tensor xc, bc;
  bool has_bias;
  int64_t M, N;
  Combo combo;
};

Args prepare(const at::Tensor& x, const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension");
  Args a;
  a.N = x.size(-1);
  a.M = a.N > 0 ? x.numel() / a.N : 0;
  a.has_bias = bias.has_value() && bias->defined();
  if (a.has_bias) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == a.N, op, ": bias must have shape [", a.N, "], got ",
                bias->sizes());
    a.bc = bias->contiguous();
  }
  a.combo = combo_of(x.scalar_type(), a.has_bias ? bias->scalar_type() : x.scalar_type(), op);
  a.xc = x.contiguous();
  return a;
}

inline const bf16_t* bp(const at::Tensor& t) { return reinterpret_cast<const bf16_t*>(t.data_ptr()); }
inline bf16_t* bpm(const at::Tensor& t) { return reinterpret_cast<bf16_t*>(t.data_ptr()); }

}  // namespace bg

at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh) {
  const auto a = bg::prepare(x, bias, "nanogpt_ext::bias_gelu_fwd");
  at::Tensor y = new_output(x, x.sizes(), x.scalar_type());
  if (a.N == 0) return y;
  const int64_t N = a.N;
  const int64_t grain = std::max<int64_t>(1, 8192 / N);
  at::parallel_for(0, a.M, grain, [&](int64_t r0, int64_t r1) {
    switch (a.combo) {
      case bg::Combo::F32_F32:
        bg::fwd_f32_f32(a.xc.data_ptr<float>(), a.has_bias ? a.bc.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                        r0, r1, N, tanh);
        break;
      case bg::Combo::BF16_BF16:
        bg::fwd_bf16_bf16(bg::bp(a.xc), a.has_bias ? bg::bp(a.bc) : nullptr, bg::bpm(y), r0, r1, N, tanh);
        break;
      case bg::Combo::BF16_F32:
        bg::fwd_bf16_f32(bg::bp(a.xc), a.has_bias ? a.bc.data_ptr<float>() : nullptr, bg::bpm(y), r0, r1, N, tanh);
        break;
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& bias, bool tanh) {
  const char* op = "nanogpt_ext::bias_gelu_bwd";
  const auto a = bg::prepare(x, bias, op);
  TORCH_CHECK(dy.device().is_cpu(), op, ": dy must be a CPU tensor");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op, ": dy (", dy.sizes(), ", ",
              dy.scalar_type(), ") must match x (", x.sizes(), ", ", x.scalar_type(), ")");
  const at::Tensor dyc = dy.contiguous();
  const int64_t M = a.M, N = a.N;
  at::Tensor dx = new_output(x, x.sizes(), x.scalar_type());
  const auto bdtype = a.has_bias ? bias->scalar_type() : x.scalar_type();
  at::Tensor db = new_output(x, {a.has_bias ? N : 0}, bdtype);
  if (N == 0) return {dx, db};
  const int64_t chunk = reduce_chunk_rows(M);
  const int64_t nchunks = (M + chunk - 1) / chunk;
  const int64_t nc = std::max<int64_t>(nchunks, 1);
  at::Tensor part = at::empty({a.has_bias ? nc : 0, N}, x.options().dtype(at::kFloat));
  if (a.has_bias && nchunks == 0) part.zero_();
  float* pp = a.has_bias ? part.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 8192 / (chunk * N));
  at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk, r1 = std::min(M, r0 + chunk);
      float* p = pp ? pp + c * N : nullptr;
      switch (a.combo) {
        case bg::Combo::F32_F32:
          bg::bwd_f32_f32(dyc.data_ptr<float>(), a.xc.data_ptr<float>(),
                          a.has_bias ? a.bc.data_ptr<float>() : nullptr, dx.data_ptr<float>(), p, r0, r1, N, tanh);
          break;
        case bg::Combo::BF16_BF16:
          bg::bwd_bf16_bf16(bg::bp(dyc), bg::bp(a.xc), a.has_bias ? bg::bp(a.bc) : nullptr, bg::bpm(dx), p, r0, r1,
                            N, tanh);
          break;
        case bg::Combo::BF16_F32:
          bg::bwd_bf16_f32(bg::bp(dyc), bg::bp(a.xc), a.has_bias ? a.bc.data_ptr<float>() : nullptr, bg::bpm(dx), p,
                           r0, r1, N, tanh);
          break;
      }
    }
  });
  if (a.has_bias) {
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / nc), [&](int64_t j0, int64_t j1) {
      if (bdtype == at::kFloat)
        sum_chunks_f32(pp, nc, N, db.data_ptr<float>(), j0, j1);
      else
        sum_chunks_bf16(pp, nc, N, bg::bpm(db), j0, j1);
    });
  }
  return {dx, db};
}

}  // namespace nanogpt_cpu
