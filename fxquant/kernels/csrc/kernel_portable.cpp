// Portable micro-kernel: plain C++, no instruction-set assumption. On x86 without popcnt the
// population count is the SWAR bit trick (as LCE's portable kernel); elsewhere the compiler's
// builtin (one instruction on aarch64).
#include "kernel_scalar.h"

namespace fxquant {
namespace {

struct PortablePop {
  static inline uint64_t count(uint64_t x) {
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (x * 0x0101010101010101ULL) >> 56;
#else
    return static_cast<uint64_t>(__builtin_popcountll(x));
#endif
  }
};

void portable_kernel(const uint64_t* a, int64_t lda, int mr, const uint64_t* panel,
                     int64_t words, int32_t* counts) {
  scalar_kernel<PortablePop>(a, lda, mr, panel, words, counts);
}

}  // namespace

Isa isa_portable() { return {"portable", kScalarMR, kScalarNR, &portable_kernel}; }

}  // namespace fxquant
