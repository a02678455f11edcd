// LayerNorm over the last dimension, CPU: forward saves fp32 mean/rstd; backward gives dx,
// dweight, dbias with dweight/dbias reduced deterministically (fixed row chunks -> fp32
// partial sums -> ordered sum over chunks). Dtypes: x in {fp32, bf16}; weight/bias in
// {x's dtype, fp32}; all math in fp32.
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <limits>

namespace nanogpt_cpu {
namespace ln {

template <class T, class W, bool HAS_BIAS>
NG_INLINE void fwd_rows(const T* __restrict x, const W* __restrict w, const W* __restrict b, T* __restrict y,
                        float* mean, float* rstd, int64_t r0, int64_t r1, int64_t N, float eps) {
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    float s = 0.0f;
    NG_SIMD_SUM(s)
    for (int64_t j = 0; j < N; ++j) s += ld(xr, j);
    const float mu = s * inv_n;
    float v = 0.0f;
    NG_SIMD_SUM(v)
    for (int64_t j = 0; j < N; ++j) {
      const float d = ld(xr, j) - mu;
      v += d * d;
    }
    const float rs = 1.0f / std::sqrt(v * inv_n + eps);
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

// dx for rows [r0, r1) and this chunk's partial sums of dy*xhat (dw_part) and dy (db_part)
template <class T, class W>
NG_INLINE void bwd_rows(const T* __restrict dy, const T* __restrict x, const W* __restrict w,
                        const float* __restrict mean, const float* __restrict rstd, T* __restrict dx,
                        float* __restrict dw_part, float* __restrict db_part, int64_t r0, int64_t r1, int64_t N) {
  const float inv_n = 1.0f / static_cast<float>(N);
  NG_SIMD
  for (int64_t j = 0; j < N; ++j) {
    dw_part[j] = 0.0f;
    db_part[j] = 0.0f;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * N;
    const T* dyr = dy + r * N;
    T* dxr = dx + r * N;
    const float mu = mean[r], rs = rstd[r];
    float a = 0.0f, c = 0.0f;
    NG_SIMD_SUM(a, c)
    for (int64_t j = 0; j < N; ++j) {
      const float xh = (ld(xr, j) - mu) * rs;
      const float g = ld(dyr, j) * ld(w, j);
      a += g;
      c += g * xh;
    }
    a *= inv_n;
    c *= inv_n;
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

// the ISA-cloned leaves (target_clones cannot be put on templates)
#define NG_LN_LEAVES(SUF, T, W)                                                                                   \
  NG_CLONES void fwd_##SUF(const T* x, const W* w, const W* b, T* y, float* mean, float* rstd, int64_t r0,       \
                           int64_t r1, int64_t N, float eps) {                                                   \
    if (b)                                                                                                       \
      fwd_rows<T, W, true>(x, w, b, y, mean, rstd, r0, r1, N, eps);                                              \
    else                                                                                                         \
      fwd_rows<T, W, false>(x, w, b, y, mean, rstd, r0, r1, N, eps);                                             \
  }                                                                                                              \
  NG_CLONES void bwd_##SUF(const T* dy, const T* x, const W* w, const float* mean, const float* rstd, T* dx,      \
                           float* dw_part, float* db_part, int64_t r0, int64_t r1, int64_t N) {                  \
    bwd_rows<T, W>(dy, x, w, mean, rstd, dx, dw_part, db_part, r0, r1, N);                                       \
  }
NG_LN_LEAVES(f32_f32, float, float)
NG_LN_LEAVES(bf16_bf16, bf16_t, bf16_t)
NG_LN_LEAVES(bf16_f32, bf16_t, float)
#undef NG_LN_LEAVES

enum class Combo { F32_F32, BF16_BF16, BF16_F32 };

Combo combo_of(const at::Tensor& x, const at::Tensor& w, const char* op) {
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  if (xt == at::kFloat && wt == at::kFloat) return Combo::F32_F32;
  if (xt == at::kBFloat16 && wt == at::kBFloat16) return Combo::BF16_BF16;
  if (xt == at::kBFloat16 && wt == at::kFloat) return Combo::BF16_F32;
  TORCH_CHECK(false, op, ": unsupported dtypes x=", xt, " weight=", wt,
              " (CPU kernels take x in float32/bfloat16 and weight in x's dtype or float32)");
}

}  // namespace ln

bool poison_outputs() {  // read on every call, so tests can switch it on and off
  const char* v = std::getenv("NANOGPT_POISON");
  return v && *v && std::string(v) != "0";
}

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  auto t = at::empty(sizes, like.options().dtype(dtype));
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

static void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "nanogpt_ext::layer_norm_fwd";
  check_cpu(x, op, "x");
  check_cpu(weight, op, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension");
  const int64_t N = x.size(-1);
  TORCH_CHECK(N > 0, op, ": the normalized dimension is empty");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, op, ": weight must have shape [", N, "], got ",
              weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from weight dtype ", weight.scalar_type());
  }
  const auto combo = ln::combo_of(x, weight, op);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t M = x.numel() / N;
  at::Tensor y = new_output(x, x.sizes(), x.scalar_type());
  at::Tensor mean = new_output(x, {M}, at::kFloat), rstd = new_output(x, {M}, at::kFloat);
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    switch (combo) {
      case ln::Combo::F32_F32:
        ln::fwd_f32_f32(xc.data_ptr<float>(), wc.data_ptr<float>(), has_bias ? bc.data_ptr<float>() : nullptr,
                        y.data_ptr<float>(), mp, rp, r0, r1, N, e);
        break;
      case ln::Combo::BF16_BF16:
        ln::fwd_bf16_bf16(reinterpret_cast<const bf16_t*>(xc.data_ptr()),
                          reinterpret_cast<const bf16_t*>(wc.data_ptr()),
                          has_bias ? reinterpret_cast<const bf16_t*>(bc.data_ptr()) : nullptr,
                          reinterpret_cast<bf16_t*>(y.data_ptr()), mp, rp, r0, r1, N, e);
        break;
      case ln::Combo::BF16_F32:
        ln::fwd_bf16_f32(reinterpret_cast<const bf16_t*>(xc.data_ptr()), wc.data_ptr<float>(),
                         has_bias ? bc.data_ptr<float>() : nullptr, reinterpret_cast<bf16_t*>(y.data_ptr()), mp, rp,
                         r0, r1, N, e);
        break;
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd, bool has_bias) {
  const char* op = "nanogpt_ext::layer_norm_bwd";
  for (auto* t : {&dy, &x, &weight, &mean, &rstd}) check_cpu(*t, op, "every argument");
  const int64_t N = x.size(-1);
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": dy shape ", dy.sizes(), " differs from x shape ", x.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy dtype ", dy.scalar_type(), " differs from x dtype ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, op, ": weight must have shape [", N, "]");
  const int64_t M = N > 0 ? x.numel() / N : 0;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == M &&
                  rstd.numel() == M,
              op, ": mean/rstd must be float32 with ", M, " elements");
  const auto combo = ln::combo_of(x, weight, op);
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = new_output(x, x.sizes(), x.scalar_type());
  at::Tensor dw = new_output(weight, {N}, weight.scalar_type());
  at::Tensor db = new_output(weight, {has_bias ? N : 0}, weight.scalar_type());

  const int64_t chunk = reduce_chunk_rows(M);
  const int64_t nchunks = (M + chunk - 1) / chunk;
  at::Tensor part = at::empty({2, std::max<int64_t>(nchunks, 1), N}, x.options().dtype(at::kFloat));
  float* dwp = part[0].data_ptr<float>();
  float* dbp = part[1].data_ptr<float>();
  if (nchunks == 0) part.zero_();
  const int64_t grain = std::max<int64_t>(1, 16384 / (chunk * N));
  at::parallel_for(0, nchunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk, r1 = std::min(M, r0 + chunk);
      float* pw = dwp + c * N;
      float* pb = dbp + c * N;
      switch (combo) {
        case ln::Combo::F32_F32:
          ln::bwd_f32_f32(dyc.data_ptr<float>(), xc.data_ptr<float>(), wc.data_ptr<float>(), mc.data_ptr<float>(),
                          rc.data_ptr<float>(), dx.data_ptr<float>(), pw, pb, r0, r1, N);
          break;
        case ln::Combo::BF16_BF16:
          ln::bwd_bf16_bf16(reinterpret_cast<const bf16_t*>(dyc.data_ptr()),
                            reinterpret_cast<const bf16_t*>(xc.data_ptr()),
                            reinterpret_cast<const bf16_t*>(wc.data_ptr()), mc.data_ptr<float>(),
                            rc.data_ptr<float>(), reinterpret_cast<bf16_t*>(dx.data_ptr()), pw, pb, r0, r1, N);
          break;
        case ln::Combo::BF16_F32:
          ln::bwd_bf16_f32(reinterpret_cast<const bf16_t*>(dyc.data_ptr()),
                           reinterpret_cast<const bf16_t*>(xc.data_ptr()), wc.data_ptr<float>(), mc.data_ptr<float>(),
                           rc.data_ptr<float>(), reinterpret_cast<bf16_t*>(dx.data_ptr()), pw, pb, r0, r1, N);
          break;
      }
    }
  });
  const int64_t nc = std::max<int64_t>(nchunks, 1);
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / nc), [&](int64_t j0, int64_t j1) {
    if (weight.scalar_type() == at::kFloat) {
      sum_chunks_f32(dwp, nc, N, dw.data_ptr<float>(), j0, j1);
      if (has_bias) sum_chunks_f32(dbp, nc, N, db.data_ptr<float>(), j0, j1);
    } else {
      sum_chunks_bf16(dwp, nc, N, reinterpret_cast<bf16_t*>(dw.data_ptr()), j0, j1);
      if (has_bias) sum_chunks_bf16(dbp, nc, N, reinterpret_cast<bf16_t*>(db.data_ptr()), j0, j1);
    }
  });
  return {dx, dw, db};
}

const char* cpu_isa() {
#if NG_CLONES_ENABLED
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2+FMA)";
  return "x86-64 baseline";
#else
  return "compiler default target";
#endif
}

}  // namespace nanogpt_cpu
