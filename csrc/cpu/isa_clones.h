// Compiles simd_math.h and the leaf kernels of one op (NG_KERNELS, e.g. "layer_norm_kernels.h")
// once per ISA clone, into nanogpt_cpu::isa_v4 / isa_v3 / isa_base (see common.h); the op's glue
// calls them through NG_ISA_PICK. Include it once per op .cpp, after every other header: a header
// first included inside a region would be compiled for that region's ISA only. No include guard.
//
// -fno-trapping-math in every region: under GCC's default trapping math the vectorizer may not
// if-convert a select whose arms do FP arithmetic (x < c ? f(x) : g(x), in exp/erf/tanh and the
// masked attention rows) unless the ISA has masked instructions, so only the AVX-512 clone
// vectorized them and the x86-64-v3 and baseline clones ran those loops one float at a time.
// The kernels never read FP exception flags, so it changes no result. One consequence: GCC does
// not inline a function compiled with trapping math (std::fabs, std::sqrt, std::log: <cmath>'s
// inline wrappers, compiled outside the regions) into a region, and a call left in a loop stops
// its vectorization; kernels call the C functions fabsf, sqrtf, logf, which GCC expands as
// builtins. (sqrtf vectorizes only without its errno branch: setup.py passes -fno-math-errno on the
// command line, which an optimize pragma cannot set for builtins.)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

#if NG_CLONES_ENABLED
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#pragma GCC optimize("no-trapping-math")
namespace nanogpt_cpu::isa_v4 {
constexpr int64_t kVecFloats = 16;  // floats in one vector register of the clone
#include "simd_math.h"
#include NG_KERNELS
}  // namespace nanogpt_cpu::isa_v4
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#pragma GCC optimize("no-trapping-math")
namespace nanogpt_cpu::isa_v3 {
constexpr int64_t kVecFloats = 8;
#include "simd_math.h"
#include NG_KERNELS
}  // namespace nanogpt_cpu::isa_v3
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
namespace nanogpt_cpu::isa_base {
constexpr int64_t kVecFloats = 4;  // SSE2 / NEON
#include "simd_math.h"
#include NG_KERNELS
}  // namespace nanogpt_cpu::isa_base
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#undef NG_KERNELS
