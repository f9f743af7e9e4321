// Scalar micro-kernel with the x86 hardware popcnt (64-bit words). Everything in this file is
// compiled for the popcnt target; the driver calls it only where the CPU has popcnt.
#include <cstdint>

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("popcnt"))), apply_to = function)
#else
#pragma GCC target("popcnt")
#endif

#include "kernel_scalar.h"

namespace fxquant {
namespace {

struct HardwarePop {
  static inline uint64_t count(uint64_t x) {
    return static_cast<uint64_t>(__builtin_popcountll(x));
  }
};

void popcnt_kernel(const uint64_t* a, int64_t lda, int mr, const uint64_t* panel,
                   int64_t words, int32_t* counts) {
  scalar_kernel<HardwarePop>(a, lda, mr, panel, words, counts);
}

}  // namespace

Isa isa_popcnt() { return {"popcnt", kScalarMR, kScalarNR, &popcnt_kernel}; }

}  // namespace fxquant

#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
#include "binary.h"
namespace fxquant {
Isa isa_popcnt() { return {"popcnt", 1, 1, nullptr}; }
}  // namespace fxquant
#endif
