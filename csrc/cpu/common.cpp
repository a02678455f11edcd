// Which ISA clone of the CPU kernels runs (common.h): the best this CPU can run, unless
// select_isa() (NANOGPT_CPU_ISA at import, set_cpu_isa() later; csrc/ext.cpp) forced one.
#include "common.h"

#include <atomic>

namespace nanogpt_cpu {

const char* const kIsaNames[kNumIsas] = {"x86-64-v4", "x86-64-v3", "default"};

bool isa_runs_here(int isa) {
#if NG_CLONES_ENABLED
  __builtin_cpu_init();  // may run before the constructor that normally calls it
  if (isa == kIsaV4) return __builtin_cpu_supports("x86-64-v4");
  if (isa == kIsaV3) return __builtin_cpu_supports("x86-64-v3");
#endif
  return isa == kIsaDefault;
}

namespace {

int best_isa() {
  int i = 0;
  while (!isa_runs_here(i)) ++i;  // ends at kIsaDefault
  return i;
}

// relaxed: a kernel already running keeps the clone it picked; later calls see the new one
std::atomic<int> g_isa{best_isa()};

std::string runnable() {
  std::string s;
  for (int i = 0; i < kNumIsas; ++i)
    if (isa_runs_here(i)) s += (s.empty() ? "" : ", ") + std::string(kIsaNames[i]);
  return s;
}

}  // namespace

int active_isa() { return g_isa.load(std::memory_order_relaxed); }

std::string select_isa(const std::string& name) {
  for (int i = 0; i < kNumIsas; ++i) {
    if (name != kIsaNames[i]) continue;
    if (!isa_runs_here(i))
      return "this " + std::string(NG_CLONES_ENABLED ? "CPU" : "build (kernels compiled once, no ISA clones)") +
             " cannot run the " + name + " clone of the CPU kernels; it runs: " + runnable();
    g_isa.store(i, std::memory_order_relaxed);
    return "";
  }
  return "unknown CPU kernel clone '" + name + "'; the clones are x86-64-v4, x86-64-v3, default, and this " +
         (NG_CLONES_ENABLED ? "CPU" : "build") + " runs: " + runnable();
}

}  // namespace nanogpt_cpu
