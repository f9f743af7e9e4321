// AVX-512 micro-kernel: 8 output channels (64-bit words) per zmm register and the hardware
// vector population count (VPOPCNTQ, AVX512_VPOPCNTDQ): xor, popcount and add per 8 words.
// Compiled for that target only; the driver calls it only where the CPU has both extensions.
#include <cstdint>

#include "binary.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vpopcntdq"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512vpopcntdq")
#endif

namespace fxquant {
namespace {

constexpr int kMR = 6;
constexpr int kV = 4;  // zmm registers per panel row
constexpr int kNR = 8 * kV;

template <int M>
void tile(const uint64_t* a, int64_t lda, const uint64_t* panel, int64_t words,
          int32_t* counts) {
  __m512i acc[M][kV];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < kV; ++v) acc[i][v] = _mm512_setzero_si512();
  for (int64_t k = 0; k < words; ++k) {
    __m512i w[kV];
    for (int v = 0; v < kV; ++v) w[v] = _mm512_loadu_si512(panel + k * kNR + 8 * v);
    for (int i = 0; i < M; ++i) {
      const __m512i x = _mm512_set1_epi64(static_cast<long long>(a[i * lda + k]));
      for (int v = 0; v < kV; ++v)
        acc[i][v] = _mm512_add_epi64(acc[i][v], _mm512_popcnt_epi64(_mm512_xor_si512(x, w[v])));
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < kV; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(counts + i * kNR + 8 * v),
                          _mm512_cvtepi64_epi32(acc[i][v]));
}

void avx512_kernel(const uint64_t* a, int64_t lda, int mr, const uint64_t* panel,
                   int64_t words, int32_t* counts) {
  switch (mr) {
    case 1: return tile<1>(a, lda, panel, words, counts);
    case 2: return tile<2>(a, lda, panel, words, counts);
    case 3: return tile<3>(a, lda, panel, words, counts);
    case 4: return tile<4>(a, lda, panel, words, counts);
    case 5: return tile<5>(a, lda, panel, words, counts);
    default: return tile<6>(a, lda, panel, words, counts);
  }
}

}  // namespace

Isa isa_avx512() { return {"avx512", kMR, kNR, &avx512_kernel}; }

}  // namespace fxquant

#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
namespace fxquant {
Isa isa_avx512() { return {"avx512", 1, 1, nullptr}; }
}  // namespace fxquant
#endif
