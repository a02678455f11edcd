// Attention leaf kernels on raw pointers, compiled once per ISA clone (isa_clones.h); the shapes,
// tile sizes and row views they share with the glue are in attention.cpp's nanogpt_cpu::attn.
namespace attn {
using namespace ::nanogpt_cpu::attn;

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

// dst[t * Dp + d] (or dst[d * Tp + t] when transposed) = src[t][d], t < T, d < D; padding untouched (zero)
template <class T>
NG_INLINE void load(Rows<T> src, int64_t Tn, int64_t D, int64_t Dp, float* __restrict dst) {
  for (int64_t t = 0; t < Tn; ++t) {
    const T* __restrict r = src.row(t);
    over_lanes(D, [&](int64_t d, int64_t) { dst[t * Dp + d] = ld(r, d); });
  }
}

// dst[d] = scale * src[d] for d < D (the head dim of an output row)
template <class T>
NG_INLINE void store_row(T* __restrict dst, const float* __restrict src, int64_t D, float scale) {
  over_lanes(D, [&](int64_t d, int64_t) { st(dst, d, src[d] * scale); });
}
template <class T>
NG_INLINE void load_transposed(Rows<T> src, int64_t Tn, int64_t D, int64_t Tp, float* __restrict dst) {
  int64_t t0 = 0;
  for (; t0 + W <= Tn; t0 += W)  // W rows at a time: contiguous stores (the loads gather down a column)
    for (int64_t d = 0; d < D; ++d) {
      const T* __restrict col = src.p + t0 * src.st + d;
      NG_SIMD
      for (int64_t c = 0; c < W; ++c) dst[d * Tp + t0 + c] = ld(col, c * src.st);
    }
  for (int64_t t = t0; t < Tn; ++t) {
    const T* r = src.row(t);
    for (int64_t d = 0; d < D; ++d) dst[d * Tp + t] = ld(r, d);
  }
}

// Sets s[j] = -inf for n <= j < nb and returns the max of s[0, n). (Row loops go through simd_math.h's
// over_lanes helpers: a loop over a run-time count ended in a scalar remainder, most of a row at T = 64.)
NG_INLINE float mask_max(float* __restrict s, int64_t n, int64_t nb) {
  return max_over(nb, [&](int64_t j) {
    s[j] = j < n ? s[j] : -std::numeric_limits<float>::infinity();
    return s[j];
  });
}

// C[r * ldc + c] = scale * sum_{k < K} A[r * lda + k] * B[k * ldb + c] for r < RB, c < ncols (a multiple of
// W): scores (A = RB query rows, B = k transposed) and weighted sums of v / k rows (A = RB rows of weights).
// NC blocks of W columns per pass: RB * NC * W / kVecFloats independent accumulator chains, 8 vectors on
// every clone, enough to hide the FMA latency (one W-block is one AVX-512 vector: with NC = 1 the AVX-512
// clone ran 4 chains at half its FMA rate). The sum over k runs in the same order for every NC.
template <int64_t NC>
NG_INLINE void gemm_cols(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb, int64_t K,
                         int64_t c0, float scale, float* __restrict C, int64_t ldc) {
  float acc[RB][NC * W] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict b = B + k * ldb + c0;
    for (int64_t r = 0; r < RB; ++r) {
      const float ar = A[r * lda + k];
      NG_SIMD
      for (int64_t c = 0; c < NC * W; ++c) acc[r][c] += ar * b[c];
    }
  }
  for (int64_t r = 0; r < RB; ++r) {
    NG_SIMD
    for (int64_t c = 0; c < NC * W; ++c) C[r * ldc + c0 + c] = acc[r][c] * scale;
  }
}
NG_INLINE void tile_gemm(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb, int64_t K,
                         int64_t ncols, float scale, float* __restrict C, int64_t ldc) {
  constexpr int64_t NC = RB * W / kVecFloats >= 8 ? 1 : 2;
  int64_t c0 = 0;
  for (; c0 + NC * W <= ncols; c0 += NC * W) gemm_cols<NC>(A, lda, B, ldb, K, c0, scale, C, ldc);
  if (c0 < ncols) gemm_cols<1>(A, lda, B, ldb, K, c0, scale, C, ldc);
}

// acc[j * Dp + d] += sum_r P[r * Tp + j] * a[r * Dp + d] for j < n: the (P^T a) updates of dk and dv
NG_INLINE void accumulate_t(const float* __restrict P, int64_t Tp, const float* __restrict a, int64_t Dp, int64_t n,
                            float* __restrict acc) {
  for (int64_t d0 = 0; d0 < Dp; d0 += W) {
    const float* __restrict ad = a + d0;
    for (int64_t j = 0; j < n; ++j) {
      float* __restrict out = acc + j * Dp + d0;
      float pr[RB];
      for (int64_t r = 0; r < RB; ++r) pr[r] = P[r * Tp + j];
      // the row sum per lane, in registers (a W-float temporary went through the stack on AVX2: the x86-64-v3
      // backward ran 2.5x slower). a's rows are read in place, not copied to a local tile first: GCC copied
      // that tile in 16-byte pieces and reloaded it as 32-byte vectors, a store-forwarding stall per reload.
      NG_SIMD
      for (int64_t c = 0; c < W; ++c) {
        float o = out[c];
        for (int64_t r = 0; r < RB; ++r) o += pr[r] * ad[r * Dp + c];
        out[c] = o;
      }
    }
  }
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
      const float m = n > 0 ? mask_max(s, n, nb) : 0.0f;
      const float sum = sum_over(nb, [&](int64_t j) {
        s[j] = vexp_nonpos(s[j] - m);  // <= 0: m is the row max; masked keys -inf -> 0
        return s[j];
      });
      l[r] = sum;
      if (n > 0) lse[i + r] = m + logf(sum);
      if (DROP) {  // after the sum: the softmax normalizes over every key, dropout then zeroes some weights
        keep_mask(sh, key, i + r, n, M);
        NG_SIMD
        for (int64_t j = 0; j < n; ++j) s[j] *= M[j];
      }
    }
    tile_gemm(S, Tp, V, Dp, nb, Dp, 1.0f, O, Dp);  // p v
    for (int64_t r = 0; r < RB && i + r < Tn; ++r) {
      const float inv = 1.0f / l[r];
      store_row(out + (i + r) * out_st, O + r * Dp, D, inv);
    }
  }
}

// The backward carves its fp32 workspace as fwd_bh does (row-major tiles padded to Tp x Dp), with more tiles.
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
        const T* __restrict orow = out.row(i + r);
        const float* __restrict dOr = dO + (i + r) * Dp;
        delta = sum_over(D, [&](int64_t d) { return dOr[d] * ld(orow, d); });
      }
      if (DROP) {  // the forward's mask, regenerated: dv takes the dropped weights, dp the same mask
        keep_mask(sh, key, i + r, n, M);
        float* pd = PD + r * Tp;
        over_lanes(nb, [&](int64_t j, int64_t) {
          const float mj = j < n ? M[j] : 0.0f;
          p[j] = j < n ? vexp_nonpos(p[j] - li) : 0.0f;
          pd[j] = p[j] * mj;
          ds[j] = p[j] * (ds[j] * mj - delta);
        });
      } else {
        over_lanes(nb, [&](int64_t j, int64_t) {
          p[j] = j < n ? vexp_nonpos(p[j] - li) : 0.0f;
          ds[j] = p[j] * (ds[j] - delta);
        });
      }
    }
    tile_gemm(dS, Tp, K, Dp, nb, Dp, 1.0f, G, Dp);  // ds k
    for (int64_t r = 0; r < RB && i + r < Tn; ++r) {
      store_row(dq + (i + r) * g_st, G + r * Dp, D, sh.scale);
    }
    accumulate_t(DROP ? PD : P, Tp, dO + i * Dp, Dp, nb, dV);
    accumulate_t(dS, Tp, Q + i * Dp, Dp, nb, dK);  // dk = scale * dS^T q, scaled when stored
  }
  for (int64_t j = 0; j < Tn; ++j) {
    store_row(dk + j * g_st, dK + j * Dp, D, sh.scale);
    store_row(dv + j * g_st, dV + j * Dp, D, 1.0f);
  }
}

template <class T>
void fwd(Rows<T> q, Rows<T> k, Rows<T> v, T* out, int64_t out_st, float* lse, const Shape& sh, uint64_t key,
         float* buf) {
  if (sh.p_drop > 0.0f)
    fwd_bh<T, true>(q, k, v, out, out_st, lse, sh, key, buf);
  else
    fwd_bh<T, false>(q, k, v, out, out_st, lse, sh, key, buf);
}

template <class T>
void bwd(Rows<T> dout, Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, const float* lse, T* dq, T* dk, T* dv,
         int64_t g_st, const Shape& sh, uint64_t key, float* buf) {
  if (sh.p_drop > 0.0f)
    bwd_bh<T, true>(dout, q, k, v, out, lse, dq, dk, dv, g_st, sh, key, buf);
  else
    bwd_bh<T, false>(dout, q, k, v, out, lse, dq, dk, dv, g_st, sh, key, buf);
}

}  // namespace attn
