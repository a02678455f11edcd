// Shared by the CPU kernels: SIMD macros, the ISA clones and which one runs, row chunking.
//
// Vectorization strategy: the hot loops take raw pointers and are plain C++ loops marked
// `#pragma omp simd` (-fopenmp-simd; -fopenmp on Linux for at::parallel_for), so the
// compiler emits SIMD code for whatever ISA the function is compiled for. On x86-64 Linux
// with GCC >= 12 each op's leaf kernels (cpu/<op>_kernels.h) are compiled three times by
// isa_clones.h, into namespaces isa_v4 (x86-64-v4 = AVX-512), isa_v3 (x86-64-v3 = AVX2+FMA) and
// isa_base (the baseline), and NG_ISA_PICK calls the clone active_isa() names: the best one this
// CPU runs, or the one NANOGPT_CPU_ISA / set_cpu_isa() forced (ext.cpp). Nothing else in the
// extension is compiled for a higher ISA than the baseline, so the .so runs on any x86-64
// machine. Elsewhere (GCC < 12, Clang, macOS, aarch64, MSVC) the kernels are compiled once
// (isa_base) for the compiler's default target and the only clone is "default".
// Multi-threading is done by the callers with at::parallel_for over rows or blocks whose
// boundaries depend only on the problem size, so results do not depend on the thread count
// (each clone is deterministic on its own; different clones may differ in the last bits).
#pragma once

#include <cstdint>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && \
    !defined(NANOGPT_NO_CLONES)
#define NG_CLONES_ENABLED 1
#else
#define NG_CLONES_ENABLED 0
#endif

#if defined(_MSC_VER)
#define NG_INLINE __forceinline
#define NG_SIMD
#define NG_SIMD_SUM(...)
#else
#define NG_INLINE inline __attribute__((always_inline))
#define NG_PRAGMA(x) _Pragma(#x)
#define NG_SIMD NG_PRAGMA(omp simd)
#define NG_SIMD_SUM(...) NG_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#endif

namespace nanogpt_cpu {

using bf16_t = uint16_t;  // storage of at::BFloat16

// The clones, best first (indices of kIsaNames); a build without clones has only kIsaDefault.
enum Isa : int { kIsaV4, kIsaV3, kIsaDefault, kNumIsas };
extern const char* const kIsaNames[kNumIsas];  // "x86-64-v4", "x86-64-v3", "default"
bool isa_runs_here(int isa);                   // compiled in, and this CPU has the instructions
int active_isa();                              // the clone the kernels call now
// Makes `name` the active clone; returns "" or, when it is unknown or cannot run here, a
// one-line reason that names it and what this CPU/build runs.
std::string select_isa(const std::string& name);

#if NG_CLONES_ENABLED
template <class F>
NG_INLINE F pick_isa(F v4, F v3, F base) {
  const int i = active_isa();
  return i == kIsaV4 ? v4 : i == kIsaV3 ? v3 : base;
}
// the active clone of a leaf kernel, e.g. NG_ISA_PICK(ln::fwd<float, float>)(args...)
#define NG_ISA_PICK(...) ::nanogpt_cpu::pick_isa(isa_v4::__VA_ARGS__, isa_v3::__VA_ARGS__, isa_base::__VA_ARGS__)
#else
#define NG_ISA_PICK(...) (&isa_base::__VA_ARGS__)
#endif

// Row-chunking for deterministic column reductions (dweight/dbias): chunk boundaries depend
// only on the number of rows, never on the number of threads.
inline int64_t reduce_chunk_rows(int64_t rows) {
  int64_t c = (rows + 1023) / 1024;  // at most ~1024 partial rows
  return c < 16 ? 16 : c;
}

}  // namespace nanogpt_cpu
