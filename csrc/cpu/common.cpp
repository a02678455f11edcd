// Shared CPU leaves: the ordered column sum over row-chunk partials (dweight/dbias).
#include "common.h"

namespace nanogpt_cpu {

template <class W>
NG_INLINE void sum_chunks(const float* __restrict part, int64_t nchunks, int64_t N, W* __restrict out, int64_t j0,
                          int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    float s = 0.0f;
    for (int64_t c = 0; c < nchunks; ++c) s += part[c * N + j];
    st(out, j, s);
  }
}

// target_clones cannot be put on templates: one cloned leaf per output type
NG_CLONES void sum_chunks_f32(const float* part, int64_t nchunks, int64_t N, float* out, int64_t j0, int64_t j1) {
  sum_chunks<float>(part, nchunks, N, out, j0, j1);
}
NG_CLONES void sum_chunks_bf16(const float* part, int64_t nchunks, int64_t N, bf16_t* out, int64_t j0, int64_t j1) {
  sum_chunks<bf16_t>(part, nchunks, N, out, j0, j1);
}

}  // namespace nanogpt_cpu
