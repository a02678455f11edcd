// Rotary position embeddings on q and k in one launch, CUDA, torch-free; the CPU kernel's contract
// (cpu/rope_kernels.h, Hugging Face's rotate-half convention): with x1, x2 the halves of a row of D = 2 * half,
// out = cat(x1 cos - x2 sin', x2 cos + x1 sin'), sin' = sign * sin (sign -1: the inverse turn, which is the
// backward), cos and sin (T, half) fp32, rows in fp32/bf16/fp16 with fp32 math. Layout: q (B, Hq, T, D) and
// k (B, Hk, T, D) at any element strides with a contiguous last dim -- the model's q and k are (B, T, H, D)
// buffers seen through a transpose, and copying them contiguous first would double this memory-bound op's
// traffic; the outputs are contiguous (B, H, T, D). Grid: blockIdx.x is one (b, h) plane, q's planes then k's
// (k may have fewer heads), so the divisions by H happen once per block; blockIdx.y tiles the positions t
// (grid-stride: any T). A block is TX threads along a row's half, each turning VEC pairs (x1[j], x2[j]) with
// 16-byte loads when half, the strides and the pointers allow, by TY rows; the planes all read the same cos/sin
// rows, which stay in L2. Elementwise: deterministic, no reductions.
#include "common.cuh"

namespace ng {
namespace {

constexpr int kThreads = 256;  // per block, at most (fewer for tiny T)

// one of q, k: x (B, H, T, 2 * half) at element strides sb, sh, st; o contiguous, same shape
template <class T>
struct Planes {
  const T* x;
  T* o;
  int64_t sb, sh, st;
  int64_t H;
};

template <class T, int VEC>
__global__ void __launch_bounds__(kThreads) rope_kernel(Planes<T> q, Planes<T> k, const float* __restrict__ cos,
                                                        const float* __restrict__ sin, int64_t q_planes, int T_,
                                                        int half, float sign) {
  // field by field, not a reference to q or k: a dynamically chosen kernel parameter goes through local memory
  const bool is_k = blockIdx.x >= q_planes;
  const int64_t bh = is_k ? blockIdx.x - q_planes : blockIdx.x;
  const int64_t H = is_k ? k.H : q.H;
  const T* x = (is_k ? k.x : q.x) + (bh / H) * (is_k ? k.sb : q.sb) + (bh % H) * (is_k ? k.sh : q.sh);
  const int64_t st = is_k ? k.st : q.st;
  T* o = (is_k ? k.o : q.o) + bh * T_ * 2 * half;
  for (int t = blockIdx.y * blockDim.y + threadIdx.y; t < T_; t += gridDim.y * blockDim.y) {
    const T* xr = x + t * st;
    T* orow = o + static_cast<int64_t>(t) * 2 * half;
    const float* c = cos + static_cast<int64_t>(t) * half;
    const float* s = sin + static_cast<int64_t>(t) * half;
    for (int j = threadIdx.x * VEC; j < half; j += blockDim.x * VEC) {
      float x1[VEC], x2[VEC], cv[VEC], sv[VEC];
      load_f<T, VEC>(xr + j, x1);
      load_f<T, VEC>(xr + half + j, x2);
      load_f<float, VEC>(c + j, cv);
      load_f<float, VEC>(s + j, sv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float si = sign * sv[i], a = x1[i], b = x2[i];
        x1[i] = a * cv[i] - b * si;
        x2[i] = b * cv[i] + a * si;
      }
      store_f<T, VEC>(orow + j, x1);
      store_f<T, VEC>(orow + half + j, x2);
    }
  }
}

inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

template <class T, int VEC>
void launch(const Planes<T>& q, const Planes<T>& k, const float* cos, const float* sin, int64_t q_planes,
            int64_t planes, int T_, int half, float sign, cudaStream_t st) {
  const int tx = pow2_at_least(half / VEC, 32);
  const int ty = pow2_at_least(T_, kThreads / tx);
  const int64_t tiles = (T_ + ty - 1) / ty;
  const dim3 grid(static_cast<unsigned>(planes), static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
  rope_kernel<T, VEC><<<grid, dim3(tx, ty), 0, st>>>(q, k, cos, sin, q_planes, T_, half, sign);
}

template <class T>
cudaError_t rope(const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin, int64_t B,
                 int64_t Hq, int64_t Hk, int T_, int half, const int64_t* qs, const int64_t* ks, float sign,
                 cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const Planes<T> qp{static_cast<const T*>(q), static_cast<T*>(qo), qs[0], qs[1], qs[2], Hq};
  const Planes<T> kp{static_cast<const T*>(k), static_cast<T*>(ko), ks[0], ks[1], ks[2], Hk};
  bool vec = half % V == 0 && aligned16(q) && aligned16(k) && aligned16(qo) && aligned16(ko) &&
             aligned_to(cos, sizeof(float) * V) && aligned_to(sin, sizeof(float) * V);
  for (int i = 0; i < 3; ++i) vec = vec && qs[i] % V == 0 && ks[i] % V == 0;
  if (vec)
    launch<T, V>(qp, kp, cos, sin, B * Hq, B * (Hq + Hk), T_, half, sign, st);
  else
    launch<T, 1>(qp, kp, cos, sin, B * Hq, B * (Hq + Hk), T_, half, sign, st);
  return cudaGetLastError();
}

}  // namespace
}  // namespace ng

extern "C" cudaError_t ng_rope(const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin,
                               int64_t B, int64_t Hq, int64_t Hk, int64_t T, int64_t half, const int64_t* q_strides,
                               const int64_t* k_strides, float sign, int dtype, cudaStream_t stream) {
  if (B < 0 || Hq < 0 || Hk < 0 || T < 0 || half < 0 || T > (1 << 30) || half > (1 << 30) ||
      B * (Hq + Hk) > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (B * (Hq + Hk) == 0 || T == 0 || half == 0) return cudaSuccess;
#define NG_CALL(X)                                                                                       \
  ng::rope<X>(q, k, qo, ko, cos, sin, B, Hq, Hk, static_cast<int>(T), static_cast<int>(half), q_strides, \
              k_strides, sign, stream)
  NG_DISPATCH_X(dtype, NG_CALL);
#undef NG_CALL
}
