// Attention on (B, H, T, D) q, k, v (causal or not), CPU, fp32/bf16 in and out, fp32 math.
//
// One (batch, head) per task: its rows are converted to fp32 in task-local buffers (k and v
// also transposed, so every inner loop runs over a contiguous dimension), then each query row
// takes an exact softmax over its keys: the row of scores is T floats, in L1 at the T a CPU
// trains at. Causal rows stop at the diagonal (half the work of a masked dense product, which
// is what torch's CPU kernels pay for in bf16). The forward saves the log-sum-exp per row; the
// backward recomputes p from it and accumulates dk/dv in fp32 per task, so results are
// deterministic and do not depend on the thread count. Dropout draws the same keep-mask as the
// Triton kernels (kernels/attention.py): Philox-4x32-10 of tl.rand, keyed by the call's seed and
// the (batch, head), counter query * T + key; the backward regenerates it. Outputs and input gradients are stored
// (B, T, H, D) and returned as (B, H, T, D) views: the model's transpose back to (B, T, C) is free.
#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace nanogpt_cpu {
namespace attn {

struct Shape {
  int64_t T, D;
  bool causal;
  float scale;
  float p_drop;   // dropout probability (0: none)
  uint64_t seed;  // the call's dropout seed
  int64_t keys(int64_t i) const { return causal ? i + 1 : T; }  // query row i sees keys [0, keys(i))
  uint64_t key(int64_t bh) const { return seed + static_cast<uint64_t>(bh) * 2654435769u; }  // as the Triton kernels
};

// tl.rand(key, counter) for an int32 counter, bit for bit: Philox-4x32-10 of (counter, 0, 0, 0)
// under the key's (low, high) words, the first output word mapped to [0, 1)
NG_INLINE float philox_uniform(uint64_t key, uint32_t counter) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2, pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x;
  std::memcpy(&x, &c0, 4);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// m[j] = 1 / (1 - p) where the weight (row, j) is kept, else 0, for j < n
NG_INLINE void keep_mask(const Shape& sh, uint64_t key, int64_t row, int64_t n, float* __restrict m) {
  const float inv = 1.0f / (1.0f - sh.p_drop);
  const uint32_t base = static_cast<uint32_t>(row * sh.T);  // the kernels' int32 counter, wrapping alike
  NG_SIMD
  for (int64_t j = 0; j < n; ++j) m[j] = philox_uniform(key, base + static_cast<uint32_t>(j)) >= sh.p_drop ? inv : 0.0f;
}

// Register tiles: RB query rows x W keys (or W head-dim columns) of fp32 accumulators. The task
// buffers are zero-padded to Tp = T and Dp = D rounded up to W, so tiles never need masks.
constexpr int64_t RB = 4, W = 16;
NG_INLINE int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }

// (B, H, T, D) rows of one (b, h): base + t * st, unit stride over D
template <class T>
struct Rows {
  const T* p;
  int64_t st;
  const T* row(int64_t t) const { return p + t * st; }
};

// dst[t * Dp + d] (or dst[d * Tp + t] when transposed) = src[t][d], t < T, d < D; padding untouched (zero)
template <class T>
NG_INLINE void load(Rows<T> src, int64_t Tn, int64_t D, int64_t Dp, float* __restrict dst) {
  for (int64_t t = 0; t < Tn; ++t) {
    const T* r = src.row(t);
    NG_SIMD
    for (int64_t d = 0; d < D; ++d) dst[t * Dp + d] = ld(r, d);
  }
}
template <class T>
NG_INLINE void load_transposed(Rows<T> src, int64_t Tn, int64_t D, int64_t Tp, float* __restrict dst) {
  for (int64_t t = 0; t < Tn; ++t) {
    const T* r = src.row(t);
    for (int64_t d = 0; d < D; ++d) dst[d * Tp + t] = ld(r, d);
  }
}

// C[r * ldc + c] = scale * sum_{k < K} A[r * lda + k] * B[k * ldb + c] for r < RB, c < ncols (a multiple of
// W): scores (A = RB query rows, B = k transposed) and weighted sums of v / k rows (A = RB rows of weights)
NG_INLINE void tile_gemm(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb, int64_t K,
                         int64_t ncols, float scale, float* __restrict C, int64_t ldc) {
  for (int64_t c0 = 0; c0 < ncols; c0 += W) {
    float acc[RB][W] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict b = B + k * ldb + c0;
      for (int64_t r = 0; r < RB; ++r) {
        const float ar = A[r * lda + k];
        NG_SIMD
        for (int64_t c = 0; c < W; ++c) acc[r][c] += ar * b[c];
      }
    }
    for (int64_t r = 0; r < RB; ++r) {
      NG_SIMD
      for (int64_t c = 0; c < W; ++c) C[r * ldc + c0 + c] = acc[r][c] * scale;
    }
  }
}

// acc[j * Dp + d] += sum_r P[r * Tp + j] * a[r * Dp + d] for j < n: the (P^T a) updates of dk and dv
NG_INLINE void accumulate_t(const float* __restrict P, int64_t Tp, const float* __restrict a, int64_t Dp, int64_t n,
                            float* __restrict acc) {
  for (int64_t d0 = 0; d0 < Dp; d0 += W) {
    float ar[RB][W];
    for (int64_t r = 0; r < RB; ++r) {
      NG_SIMD
      for (int64_t c = 0; c < W; ++c) ar[r][c] = a[r * Dp + d0 + c];
    }
    for (int64_t j = 0; j < n; ++j) {
      float* __restrict out = acc + j * Dp + d0;
      float o[W];
      NG_SIMD
      for (int64_t c = 0; c < W; ++c) o[c] = out[c];
      for (int64_t r = 0; r < RB; ++r) {
        const float pr = P[r * Tp + j];
        NG_SIMD
        for (int64_t c = 0; c < W; ++c) o[c] += pr * ar[r][c];
      }
      NG_SIMD
      for (int64_t c = 0; c < W; ++c) out[c] = o[c];
    }
  }
}

// Rows [i, i + RB) of a task: how many keys their tile covers, and each row's own count (0 past T)
NG_INLINE int64_t tile_keys(const Shape& sh, int64_t i) {
  return round_up(sh.causal ? std::min(i + RB, sh.T) : sh.T);
}
NG_INLINE int64_t row_keys(const Shape& sh, int64_t row) { return row < sh.T ? sh.keys(row) : 0; }

// task buffer sizes in floats (Tp rows of Dp, Dp rows of Tp, RB rows of Tp)
NG_INLINE int64_t fwd_buffer(int64_t Tn, int64_t D) {
  return 3 * round_up(Tn) * round_up(D) + RB * (round_up(Tn) + round_up(D)) + round_up(Tn);
}
NG_INLINE int64_t bwd_buffer(int64_t Tn, int64_t D) {
  return 7 * round_up(Tn) * round_up(D) + RB * (3 * round_up(Tn) + round_up(D)) + round_up(Tn);
}

template <class T, bool DROP>
NG_INLINE void fwd_bh(Rows<T> q, Rows<T> k, Rows<T> v, T* out, int64_t out_st, float* lse, const Shape& sh,
                      uint64_t key, float* buf) {
  const int64_t Tn = sh.T, D = sh.D, Tp = round_up(Tn), Dp = round_up(D);
  float* Q = buf;
  float* KT = Q + Tp * Dp;
  float* V = KT + Tp * Dp;
  float* S = V + Tp * Dp;
  float* O = S + RB * Tp;
  float* M = O + RB * Dp;
  load(q, Tn, D, Dp, Q);
  load_transposed(k, Tn, D, Tp, KT);
  load(v, Tn, D, Dp, V);
  float l[RB];
  for (int64_t i = 0; i < Tn; i += RB) {
    const int64_t nb = tile_keys(sh, i);
    tile_gemm(Q + i * Dp, Dp, KT, Tp, Dp, nb, sh.scale, S, Tp);  // scores
    for (int64_t r = 0; r < RB; ++r) {
      float* s = S + r * Tp;
      const int64_t n = row_keys(sh, i + r);
      float m = -std::numeric_limits<float>::infinity();
      NG_SIMD_MAX(m)
      for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;  // not std::max: its reference blocks vectorizing
      float sum = 0.0f;
      NG_SIMD_SUM(sum)
      for (int64_t j = 0; j < nb; ++j) {
        s[j] = j < n ? vexp(s[j] - m) : 0.0f;
        sum += s[j];
      }
      l[r] = sum;
      if (n > 0) lse[i + r] = m + std::log(sum);
      if (DROP) {  // after the sum: the softmax normalizes over every key, dropout then zeroes some weights
        keep_mask(sh, key, i + r, n, M);
        NG_SIMD
        for (int64_t j = 0; j < n; ++j) s[j] *= M[j];
      }
    }
    tile_gemm(S, Tp, V, Dp, nb, Dp, 1.0f, O, Dp);  // p v
    for (int64_t r = 0; r < RB && i + r < Tn; ++r) {
      const float inv = 1.0f / l[r];
      T* orow = out + (i + r) * out_st;
      NG_SIMD
      for (int64_t d = 0; d < D; ++d) st(orow, d, O[r * Dp + d] * inv);
    }
  }
}

template <class T, bool DROP>
NG_INLINE void bwd_bh(Rows<T> dout, Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, const float* lse, T* dq, T* dk,
                      T* dv, int64_t g_st, const Shape& sh, uint64_t key, float* buf) {
  const int64_t Tn = sh.T, D = sh.D, Tp = round_up(Tn), Dp = round_up(D);
  float* Q = buf;
  float* K = Q + Tp * Dp;
  float* KT = K + Tp * Dp;
  float* VT = KT + Tp * Dp;
  float* dO = VT + Tp * Dp;
  float* dK = dO + Tp * Dp;
  float* dV = dK + Tp * Dp;
  float* P = dV + Tp * Dp;
  float* dS = P + RB * Tp;
  float* G = dS + RB * Tp;
  float* PD = G + RB * Dp;  // dropped weights p * mask (dv's factor); P itself without dropout
  float* M = PD + RB * Tp;
  load(q, Tn, D, Dp, Q);
  load(k, Tn, D, Dp, K);
  load_transposed(k, Tn, D, Tp, KT);
  load_transposed(v, Tn, D, Tp, VT);
  load(dout, Tn, D, Dp, dO);
  NG_SIMD
  for (int64_t e = 0; e < 2 * Tp * Dp; ++e) dK[e] = 0.0f;  // dK and dV are adjacent
  for (int64_t i = 0; i < Tn; i += RB) {
    const int64_t nb = tile_keys(sh, i);
    tile_gemm(Q + i * Dp, Dp, KT, Tp, Dp, nb, sh.scale, P, Tp);  // scores
    tile_gemm(dO + i * Dp, Dp, VT, Tp, Dp, nb, 1.0f, dS, Tp);  // dp
    for (int64_t r = 0; r < RB; ++r) {
      float* p = P + r * Tp;
      float* ds = dS + r * Tp;
      const int64_t n = row_keys(sh, i + r);
      const float li = n > 0 ? lse[i + r] : 0.0f;
      // delta = rowsum(dO * O) with O as stored (in its dtype), as FlashAttention does
      float delta = 0.0f;
      if (n > 0) {
        const T* orow = out.row(i + r);
        const float* dOr = dO + (i + r) * Dp;
        NG_SIMD_SUM(delta)
        for (int64_t d = 0; d < D; ++d) delta += dOr[d] * ld(orow, d);
      }
      if (DROP) {  // the forward's mask, regenerated: dv takes the dropped weights, dp the same mask
        keep_mask(sh, key, i + r, n, M);
        float* pd = PD + r * Tp;
        NG_SIMD
        for (int64_t j = 0; j < nb; ++j) {
          const float mj = j < n ? M[j] : 0.0f;
          p[j] = j < n ? vexp(p[j] - li) : 0.0f;
          pd[j] = p[j] * mj;
          ds[j] = p[j] * (ds[j] * mj - delta);
        }
      } else {
        NG_SIMD
        for (int64_t j = 0; j < nb; ++j) {
          p[j] = j < n ? vexp(p[j] - li) : 0.0f;
          ds[j] = p[j] * (ds[j] - delta);
        }
      }
    }
    tile_gemm(dS, Tp, K, Dp, nb, Dp, 1.0f, G, Dp);  // ds k
    for (int64_t r = 0; r < RB && i + r < Tn; ++r) {
      T* dqrow = dq + (i + r) * g_st;
      NG_SIMD
      for (int64_t d = 0; d < D; ++d) st(dqrow, d, G[r * Dp + d] * sh.scale);
    }
    accumulate_t(DROP ? PD : P, Tp, dO + i * Dp, Dp, nb, dV);
    accumulate_t(dS, Tp, Q + i * Dp, Dp, nb, dK);  // dk = scale * dS^T q, scaled when stored
  }
  for (int64_t j = 0; j < Tn; ++j) {
    NG_SIMD
    for (int64_t d = 0; d < D; ++d) {
      st(dk + j * g_st, d, dK[j * Dp + d] * sh.scale);
      st(dv + j * g_st, d, dV[j * Dp + d]);
    }
  }
}

// target_clones cannot be put on templates: one cloned leaf per dtype and direction
#define NG_ATTN_LEAVES(SUF, T)                                                                                     \
  NG_CLONES void fwd_##SUF(Rows<T> q, Rows<T> k, Rows<T> v, T* out, int64_t out_st, float* lse, const Shape& sh,   \
                           uint64_t key, float* buf) {                                                             \
    if (sh.p_drop > 0.0f)                                                                                          \
      fwd_bh<T, true>(q, k, v, out, out_st, lse, sh, key, buf);                                                    \
    else                                                                                                           \
      fwd_bh<T, false>(q, k, v, out, out_st, lse, sh, key, buf);                                                   \
  }                                                                                                                \
  NG_CLONES void bwd_##SUF(Rows<T> dout, Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, const float* lse, T* dq,     \
                           T* dk, T* dv, int64_t g_st, const Shape& sh, uint64_t key, float* buf) {                \
    if (sh.p_drop > 0.0f)                                                                                          \
      bwd_bh<T, true>(dout, q, k, v, out, lse, dq, dk, dv, g_st, sh, key, buf);                                    \
    else                                                                                                           \
      bwd_bh<T, false>(dout, q, k, v, out, lse, dq, dk, dv, g_st, sh, key, buf);                                   \
  }
NG_ATTN_LEAVES(f32, float)
NG_ATTN_LEAVES(bf16, bf16_t)
#undef NG_ATTN_LEAVES

// unit stride over D (a copy otherwise); same (B, H, T, D) shape and dtype as q
at::Tensor checked(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected q's shape ", q.sizes(),
              " (B, H, T, D)");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " is ", t.scalar_type(), ", expected q's dtype ",
              q.scalar_type());
  return t.stride(3) == 1 ? t : t.contiguous();
}

void check_q(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, T, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
              ": CPU attention takes float32 or bfloat16, got ", q.scalar_type());
}

// (B, H, T, D) view of a new (B, T, H, D) buffer
at::Tensor new_bthd(const at::Tensor& q) {
  return new_output(q, {q.size(0), q.size(2), q.size(1), q.size(3)}, q.scalar_type()).transpose(1, 2);
}

template <class T>
Rows<T> rows(const at::Tensor& t, int64_t b, int64_t h) {
  return {reinterpret_cast<const T*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}
template <class T>
T* out_ptr(const at::Tensor& t, int64_t b, int64_t h) {
  return reinterpret_cast<T*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1);
}

}  // namespace attn

// dropout's Shape fields from (dropout_p, seed)
static void dropout_args(double dropout_p, const std::optional<at::Tensor>& seed, const char* op, attn::Shape& sh) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  sh.p_drop = static_cast<float>(dropout_p);
  sh.seed = 0;
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 && seed->device().is_cpu() &&
                    seed->scalar_type() == at::kLong,
                op, ": dropout_p > 0 needs seed, a one-element int64 CPU tensor");
    sh.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 bool causal, double scale, double dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  const char* op = "nanogpt_ext::attention_fwd";
  attn::check_q(q_, op);
  const at::Tensor q = attn::checked(q_, q_, op, "q"), k = attn::checked(k_, q_, op, "k"),
                   v = attn::checked(v_, q_, op, "v");
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3);
  at::Tensor out = attn::new_bthd(q);
  at::Tensor lse = new_output(q, {B, H, Tn}, at::kFloat);
  attn::Shape sh{Tn, D, causal, static_cast<float>(scale), 0.0f, 0};
  dropout_args(dropout_p, seed, op, sh);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(attn::fwd_buffer(Tn, D));  // zero: the padding stays zero
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      float* l = lse.data_ptr<float>() + t * Tn;
      if (bf16)
        attn::fwd_bf16(attn::rows<bf16_t>(q, b, h), attn::rows<bf16_t>(k, b, h), attn::rows<bf16_t>(v, b, h),
                       attn::out_ptr<bf16_t>(out, b, h), out.stride(2), l, sh, sh.key(t), buf.data());
      else
        attn::fwd_f32(attn::rows<float>(q, b, h), attn::rows<float>(k, b, h), attn::rows<float>(v, b, h),
                      attn::out_ptr<float>(out, b, h), out.stride(2), l, sh, sh.key(t), buf.data());
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout_, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out_, const at::Tensor& lse,
                                                             bool causal, double scale, double dropout_p,
                                                             const std::optional<at::Tensor>& seed) {
  const char* op = "nanogpt_ext::attention_bwd";
  attn::check_q(q_, op);
  const at::Tensor q = attn::checked(q_, q_, op, "q"), k = attn::checked(k_, q_, op, "k"),
                   v = attn::checked(v_, q_, op, "v"), out = attn::checked(out_, q_, op, "out"),
                   dout = attn::checked(dout_, q_, op, "grad of out");
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({B, H, Tn}),
              op, ": lse must be a contiguous float32 CPU tensor of shape (B, H, T) from attention_fwd");
  at::Tensor dq = attn::new_bthd(q), dk = attn::new_bthd(q), dv = attn::new_bthd(q);
  attn::Shape sh{Tn, D, causal, static_cast<float>(scale), 0.0f, 0};
  dropout_args(dropout_p, seed, op, sh);
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(attn::bwd_buffer(Tn, D));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const float* l = lse.data_ptr<float>() + t * Tn;
      if (bf16)
        attn::bwd_bf16(attn::rows<bf16_t>(dout, b, h), attn::rows<bf16_t>(q, b, h), attn::rows<bf16_t>(k, b, h),
                       attn::rows<bf16_t>(v, b, h), attn::rows<bf16_t>(out, b, h), l,
                       attn::out_ptr<bf16_t>(dq, b, h), attn::out_ptr<bf16_t>(dk, b, h),
                       attn::out_ptr<bf16_t>(dv, b, h), dq.stride(2), sh, sh.key(t), buf.data());
      else
        attn::bwd_f32(attn::rows<float>(dout, b, h), attn::rows<float>(q, b, h), attn::rows<float>(k, b, h),
                      attn::rows<float>(v, b, h), attn::rows<float>(out, b, h), l, attn::out_ptr<float>(dq, b, h),
                      attn::out_ptr<float>(dk, b, h), attn::out_ptr<float>(dv, b, h), dq.stride(2), sh, sh.key(t),
                      buf.data());
    }
  });
  return {dq, dk, dv};
}

}  // namespace nanogpt_cpu
