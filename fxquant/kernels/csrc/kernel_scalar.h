// The scalar micro-kernel, included by kernel_portable.cpp and kernel_popcnt.cpp: the same code
// compiled with and without the hardware popcount (internal linkage, so the two never mix).
#pragma once

#include <cstdint>

#include "binary.h"

namespace fxquant {
namespace {

constexpr int kScalarMR = 4;
constexpr int kScalarNR = 8;

// Register block of 2 rows x 4 channels: 8 accumulators, 2 + 4 loads per word.
template <class Pop>
void scalar_kernel(const uint64_t* a, int64_t lda, int mr, const uint64_t* panel,
                   int64_t words, int32_t* counts) {
  constexpr int NR = kScalarNR;
  for (int i0 = 0; i0 < mr; i0 += 2) {
    const bool two = i0 + 1 < mr;
    const uint64_t* a0 = a + i0 * lda;
    const uint64_t* a1 = two ? a0 + lda : a0;
    for (int j0 = 0; j0 < NR; j0 += 4) {
      uint64_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      const uint64_t* w = panel + j0;
      for (int64_t k = 0; k < words; ++k, w += NR) {
        const uint64_t x0 = a0[k], x1 = a1[k];
        const uint64_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
        s00 += Pop::count(x0 ^ w0);
        s01 += Pop::count(x0 ^ w1);
        s02 += Pop::count(x0 ^ w2);
        s03 += Pop::count(x0 ^ w3);
        s10 += Pop::count(x1 ^ w0);
        s11 += Pop::count(x1 ^ w1);
        s12 += Pop::count(x1 ^ w2);
        s13 += Pop::count(x1 ^ w3);
      }
      int32_t* c0 = counts + i0 * NR + j0;
      c0[0] = static_cast<int32_t>(s00);
      c0[1] = static_cast<int32_t>(s01);
      c0[2] = static_cast<int32_t>(s02);
      c0[3] = static_cast<int32_t>(s03);
      if (two) {
        int32_t* c1 = c0 + NR;
        c1[0] = static_cast<int32_t>(s10);
        c1[1] = static_cast<int32_t>(s11);
        c1[2] = static_cast<int32_t>(s12);
        c1[3] = static_cast<int32_t>(s13);
      }
    }
  }
}

}  // namespace
}  // namespace fxquant
