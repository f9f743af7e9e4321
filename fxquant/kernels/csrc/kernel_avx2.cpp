// AVX2 micro-kernel: 4 output channels (64-bit words) per ymm register, the population count by
// nibble lookup (vpshufb) accumulated in bytes and widened with vpsadbw every 31 words.
// Compiled for avx2 only; the driver calls it only where the CPU has AVX2.
#include <cstdint>

#include "binary.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC target("avx2")
#endif

namespace fxquant {
namespace {

constexpr int kMR = 4;
constexpr int kNR = 8;  // two ymm registers of four words

inline __m256i popcount_bytes(__m256i x, __m256i lut, __m256i low) {
  const __m256i lo = _mm256_and_si256(x, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

template <int M>
void tile(const uint64_t* a, int64_t lda, const uint64_t* panel, int64_t words,
          int32_t* counts) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i total[M][2];
  for (int i = 0; i < M; ++i) total[i][0] = total[i][1] = zero;
  for (int64_t k0 = 0; k0 < words; k0 += 31) {  // a byte holds at most 31 * 8 = 248
    const int64_t k1 = words < k0 + 31 ? words : k0 + 31;
    __m256i acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = zero;
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kNR));
      const __m256i w1 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kNR + 4));
      for (int i = 0; i < M; ++i) {
        const __m256i x = _mm256_set1_epi64x(static_cast<long long>(a[i * lda + k]));
        acc[i][0] = _mm256_add_epi8(acc[i][0],
                                    popcount_bytes(_mm256_xor_si256(x, w0), lut, low));
        acc[i][1] = _mm256_add_epi8(acc[i][1],
                                    popcount_bytes(_mm256_xor_si256(x, w1), lut, low));
      }
    }
    for (int i = 0; i < M; ++i) {
      total[i][0] = _mm256_add_epi64(total[i][0], _mm256_sad_epu8(acc[i][0], zero));
      total[i][1] = _mm256_add_epi64(total[i][1], _mm256_sad_epu8(acc[i][1], zero));
    }
  }
  for (int i = 0; i < M; ++i) {
    alignas(32) uint64_t lanes[kNR];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4), total[i][1]);
    for (int j = 0; j < kNR; ++j) counts[i * kNR + j] = static_cast<int32_t>(lanes[j]);
  }
}

void avx2_kernel(const uint64_t* a, int64_t lda, int mr, const uint64_t* panel,
                 int64_t words, int32_t* counts) {
  switch (mr) {
    case 1: return tile<1>(a, lda, panel, words, counts);
    case 2: return tile<2>(a, lda, panel, words, counts);
    case 3: return tile<3>(a, lda, panel, words, counts);
    default: return tile<4>(a, lda, panel, words, counts);
  }
}

}  // namespace

Isa isa_avx2() { return {"avx2", kMR, kNR, &avx2_kernel}; }

}  // namespace fxquant

#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
namespace fxquant {
Isa isa_avx2() { return {"avx2", 1, 1, nullptr}; }
}  // namespace fxquant
#endif
