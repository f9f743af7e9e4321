// fxquant packed binary kernels: conv2d and linear layers computed with xor + popcount.
//
// What they compute is defined by fxquant/kernels/reference.py, bit for bit:
//   y = float(dot) * scale[c] (+ bias[c]),  dot = sum over valid taps and channels of s(x) * w
// with s(x) = +1 where x >= 0 and -1 below (the input is packed on the fly: bit 1 where NOT
// x >= 0), w = +1 for weight bit 0 and -1 for bit 1, and zero padding contributing 0.
//
// Conv: the input is packed channels-last, (N, H, W, groups, words); rows of the packed
// im2col (one per output pixel and group, taps x words, padded taps zero) meet weight panels
// (NR output channels interleaved word by word, each 64-bit word assembled from up to 8 bytes
// of the byte-granular weight rows, zero filled) in an ISA-specific micro-kernel that counts
// popcount(a XOR w) for a block of MR pixels x NR channels. A padded tap's zero word adds
// popcount(w) there, so border pixels subtract that per channel, read from 2-D prefix sums of
// the per-tap weight popcounts over the valid tap rectangle; dot = taps * K - 2 * count.
// Returning None (std::nullopt) tells Python to use the reference (NaN in the input).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "binary.h"

#if defined(__SSE2__)
#include <xmmintrin.h>
#include <emmintrin.h>
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fxquant binary kernels read packed uint8 weights as little-endian 64-bit words"
#endif

namespace fxquant {
namespace {

bool cpu_has(const char* feature) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const std::string f(feature);
  if (f == "popcnt") return __builtin_cpu_supports("popcnt");
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
  }
#endif
  (void)feature;
  return false;
}

// The kernels this build and CPU can run, slowest first.
const std::vector<Isa>& supported_isas() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> out{isa_portable()};
    const Isa candidates[] = {isa_popcnt(), isa_avx2(), isa_avx512()};
    for (const Isa& isa : candidates) {
      if (isa.kernel != nullptr && cpu_has(isa.name)) out.push_back(isa);
    }
    return out;
  }();
  return isas;
}

// The fastest kernel, or the one FXQUANT_BINARY_ISA names (read on every call).
const Isa& select_isa() {
  const auto& isas = supported_isas();
  const char* env = std::getenv("FXQUANT_BINARY_ISA");
  const std::string want = env == nullptr ? "" : env;
  if (want.empty() || want == "auto") return isas.back();
  std::string names;
  for (const Isa& isa : isas) {
    if (want == isa.name) return isa;
    names += std::string(names.empty() ? "" : ", ") + isa.name;
  }
  TORCH_CHECK(false, "FXQUANT_BINARY_ISA=", want, " is not available on this CPU; set it to one "
              "of: auto, ", names, " (or unset it)");
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 1 where NOT (v >= 0): v < 0, -inf (and NaN, which the caller rejects).
inline uint64_t negative_bit(float v) { return static_cast<uint64_t>(!(v >= 0.f)); }

// The negative bits of 8 contiguous floats (bit k for src[k]); nan |= any of them is NaN.
inline uint64_t negative_bits8(const float* src, bool& nan) {
#if defined(__SSE2__)
  const __m128 lo = _mm_loadu_ps(src), hi = _mm_loadu_ps(src + 4), zero = _mm_setzero_ps();
  nan |= _mm_movemask_ps(_mm_or_ps(_mm_cmpunord_ps(lo, lo), _mm_cmpunord_ps(hi, hi))) != 0;
  return static_cast<uint64_t>(_mm_movemask_ps(_mm_cmpnge_ps(lo, zero)) |
                               (_mm_movemask_ps(_mm_cmpnge_ps(hi, zero)) << 4));
#else
  uint64_t bits = 0;
  for (int k = 0; k < 8; ++k) {
    nan |= src[k] != src[k];
    bits |= negative_bit(src[k]) << k;
  }
  return bits;
#endif
}

// One packed word of `bits` (<= 64) contiguous floats.
inline uint64_t pack_word(const float* src, int bits, bool& nan) {
  uint64_t word = 0;
  int b = 0;
  for (; b + 8 <= bits; b += 8) word |= negative_bits8(src + b, nan) << b;
  for (; b < bits; ++b) {
    nan |= src[b] != src[b];
    word |= negative_bit(src[b]) << b;
  }
  return word;
}

// Transpose an 8 x 8 bit matrix held in a word: bit 8 * r + k moves to bit 8 * k + r.
inline uint64_t transpose8(uint64_t x) {
  uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
  x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
  x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
  return x ^ t ^ (t << 28);
}

// Channel bits [c0, c0 + bits) of one image row whose pixels are contiguous (NCHW): words[w]
// for w < W, 8 channels x 8 pixels at a time (a bit-matrix transpose per block).
void pack_planar_row(const float* base, int64_t sC, int64_t W, int64_t c0, int bits,
                     uint64_t* words, bool& nan) {
  std::fill(words, words + W, 0);
  for (int cb = 0; cb < bits; cb += 8) {
    const int rows = std::min(8, bits - cb);
    const float* src[8];
    for (int r = 0; r < rows; ++r) src[r] = base + (c0 + cb + r) * sC;
    const int shift = cb;
    int64_t w = 0;
    for (; w + 8 <= W; w += 8) {
      uint64_t block = 0;
      for (int r = 0; r < rows; ++r) block |= negative_bits8(src[r] + w, nan) << (8 * r);
      block = transpose8(block);  // byte k: the channels of pixel w + k
      for (int k = 0; k < 8; ++k) words[w + k] |= ((block >> (8 * k)) & 0xffULL) << shift;
    }
    for (; w < W; ++w) {
      for (int r = 0; r < rows; ++r) {
        const float v = src[r][w];
        nan |= v != v;
        words[w] |= negative_bit(v) << (shift + r);
      }
    }
  }
}

// Pack a 4-D float input (any strides) into (N, H, W, G, Wg) words. False where a NaN was seen.
bool pack_conv_input(const at::Tensor& x, int64_t groups, int64_t cg, int64_t wg,
                     uint64_t* packed) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const float* xp = x.data_ptr<float>();
  const int64_t pixel_words = groups * wg;
  std::atomic<bool> nan{false};
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    bool seen_nan = false;
    std::vector<uint64_t> words(W);
    for (int64_t r = begin; r < end; ++r) {
      const float* base = xp + (r / H) * sN + (r % H) * sH;
      uint64_t* dst = packed + r * W * pixel_words;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t j = 0; j < wg; ++j) {
          const int64_t c0 = g * cg + 64 * j;
          const int bits = static_cast<int>(std::min<int64_t>(64, cg - 64 * j));
          if (sC == 1) {  // channels last: each pixel's channels are contiguous
            for (int64_t w = 0; w < W; ++w) {
              dst[w * pixel_words + g * wg + j] = pack_word(base + w * sW + c0, bits, seen_nan);
            }
          } else if (sW == 1) {
            pack_planar_row(base, sC, W, c0, bits, words.data(), seen_nan);
            for (int64_t w = 0; w < W; ++w) dst[w * pixel_words + g * wg + j] = words[w];
          } else {
            for (int64_t w = 0; w < W; ++w) {
              uint64_t word = 0;
              for (int b = 0; b < bits; ++b) {
                const float v = base[(c0 + b) * sC + w * sW];
                seen_nan |= v != v;
                word |= negative_bit(v) << b;
              }
              dst[w * pixel_words + g * wg + j] = word;
            }
          }
        }
      }
    }
    if (seen_nan) nan = true;
  });
  return !nan;
}

// Pack rows of a contiguous (M, K) float matrix into (M, words). False where a NaN was seen.
bool pack_rows(const float* xp, int64_t M, int64_t K, int64_t words, uint64_t* packed) {
  std::atomic<bool> nan{false};
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    bool seen_nan = false;
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t j = 0; j < words; ++j) {
        const int bits = static_cast<int>(std::min<int64_t>(64, K - 64 * j));
        packed[m * words + j] = pack_word(xp + m * K + 64 * j, bits, seen_nan);
      }
    }
    if (seen_nan) nan = true;
  });
  return !nan;
}

// out[j * plane + offset[i]] = float(dot[i * ld + j]) * scale[j] (+ bias[j]) for i < rows,
// j < channels: the pixel-major dot products of one work unit written into NCHW channel planes,
// 4 x 4 blocks at a time (converted, transposed, scaled) where the pixels are consecutive.
void store_planes(const int32_t* dot, int64_t ld, int64_t rows, int64_t channels,
                  const int64_t* offset, const float* scale, const float* bias, float* out,
                  int64_t plane) {
  auto one = [&](int64_t i, int64_t j) {
    float y = static_cast<float>(dot[i * ld + j]) * scale[j];
    if (bias != nullptr) y = y + bias[j];
    out[j * plane + offset[i]] = y;
  };
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 4 <= channels; j += 4) {
    const __m128 s0 = _mm_set1_ps(scale[j]), s1 = _mm_set1_ps(scale[j + 1]);
    const __m128 s2 = _mm_set1_ps(scale[j + 2]), s3 = _mm_set1_ps(scale[j + 3]);
    float* o = out + j * plane;
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
      if (offset[i + 3] != offset[i] + 3) {  // an image boundary inside: element by element
        for (int64_t ii = i; ii < i + 4; ++ii)
          for (int64_t r = 0; r < 4; ++r) one(ii, j + r);
        continue;
      }
      const int32_t* d = dot + i * ld + j;
      __m128 r0 = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d)));
      __m128 r1 = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + ld)));
      __m128 r2 = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 2 * ld)));
      __m128 r3 = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 3 * ld)));
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r: channel j + r of pixels i .. i + 3
      r0 = _mm_mul_ps(r0, s0);
      r1 = _mm_mul_ps(r1, s1);
      r2 = _mm_mul_ps(r2, s2);
      r3 = _mm_mul_ps(r3, s3);
      if (bias != nullptr) {
        r0 = _mm_add_ps(r0, _mm_set1_ps(bias[j]));
        r1 = _mm_add_ps(r1, _mm_set1_ps(bias[j + 1]));
        r2 = _mm_add_ps(r2, _mm_set1_ps(bias[j + 2]));
        r3 = _mm_add_ps(r3, _mm_set1_ps(bias[j + 3]));
      }
      _mm_storeu_ps(o + offset[i], r0);
      _mm_storeu_ps(o + plane + offset[i], r1);
      _mm_storeu_ps(o + 2 * plane + offset[i], r2);
      _mm_storeu_ps(o + 3 * plane + offset[i], r3);
    }
    for (; i < rows; ++i)
      for (int64_t r = 0; r < 4; ++r) one(i, j + r);
  }
#endif
  for (; j < channels; ++j)
    for (int64_t i = 0; i < rows; ++i) one(i, j);
}

// Word k (channels 64k .. 64k + 63) of a packed weight row of rb bytes: up to 8 bytes, the
// rest zero (rows are byte-granular, see reference.py; the kernels work on 64-bit words).
inline uint64_t row_word(const uint8_t* row, int64_t rb, int64_t k) {
  uint64_t word = 0;
  if (8 * k + 8 <= rb) {
    std::memcpy(&word, row + 8 * k, 8);
  } else {
    for (int64_t b = 8 * k; b < rb; ++b) {
      word |= static_cast<uint64_t>(row[b]) << (8 * (b - 8 * k));
    }
  }
  return word;
}

// The weight rows of output channels [o0, o0 + n) (n <= NR; T taps of rb bytes each, wg words
// per tap, L = T * wg) as one panel of NR interleaved rows, channels past n zero:
// panel[(t * wg + k) * NR + j] = word k of tap t of channel o0 + j.
void build_panel(const uint8_t* bits, int64_t o0, int64_t n, int64_t T, int64_t rb, int64_t wg,
                 int NR, uint64_t* panel) {
  const uint8_t* first = bits + o0 * T * rb;
  const int64_t stride = T * rb;  // bytes from one channel's row to the next
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < wg; ++k, panel += NR) {
      const uint8_t* src = first + t * rb;
      int64_t j = 0;
      if (8 * k + 8 <= rb) {
        for (; j < n; ++j, src += stride) std::memcpy(panel + j, src + 8 * k, 8);
      } else {
        for (; j < n; ++j, src += stride) panel[j] = row_word(src, rb, k);
      }
      for (; j < NR; ++j) panel[j] = 0;
    }
  }
}

// Every weight panel (groups * rows_per_group channels), built in parallel into uninitialised
// memory: panels[((g * P + p) * L) * NR ...] = build_panel of channels g * rows_per_group + p * NR.
// Per call by design (no second resident copy of the weights); bgemm skips it where each panel
// is used once (see there).
std::unique_ptr<uint64_t[]> make_panels(const uint8_t* bits, int64_t groups,
                                        int64_t rows_per_group, int64_t T, int64_t rb,
                                        int64_t wg, int NR) {
  const int64_t P = div_up(rows_per_group, NR), L = T * wg;
  std::unique_ptr<uint64_t[]> panels(new uint64_t[static_cast<size_t>(groups * P * L * NR)]);
  at::parallel_for(0, groups * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t g = u / P, p = u % P;
      build_panel(bits, g * rows_per_group + p * NR,
                  std::min<int64_t>(NR, rows_per_group - p * NR), T, rb, wg, NR,
                  panels.get() + u * L * NR);
    }
  });
  return panels;
}

// Per output channel, 2-D prefix sums over the taps of popcount(weight words):
// prefix[o][(i) * (KW + 1) + j] = sum of tap counts over rows < i and columns < j.
std::vector<int32_t> tap_prefix_sums(const uint8_t* bits, int64_t rows, int64_t KH, int64_t KW,
                                     int64_t rb) {
  const int64_t S = (KH + 1) * (KW + 1);
  std::vector<int32_t> prefix(static_cast<size_t>(rows * S), 0);
  for (int64_t o = 0; o < rows; ++o) {
    int32_t* P = prefix.data() + o * S;
    for (int64_t i = 0; i < KH; ++i) {
      for (int64_t j = 0; j < KW; ++j) {
        int32_t count = 0;
        const uint8_t* row = bits + ((o * KH + i) * KW + j) * rb;
        for (int64_t k = 0; k < div_up(rb, 8); ++k) {
          count += __builtin_popcountll(row_word(row, rb, k));
        }
        P[(i + 1) * (KW + 1) + j + 1] =
            count + P[i * (KW + 1) + j + 1] + P[(i + 1) * (KW + 1) + j] - P[i * (KW + 1) + j];
      }
    }
  }
  return prefix;
}

// Rows (pixels) per unit of parallel work: a multiple of every kernel's MR.
constexpr int64_t kBlockRows = 96;

// Runs the micro-kernel over rows [0, M) of A (per group g at A + g * group_stride, row stride
// lda) against the weight panels of the packed weight rows `bits` (groups * rows_per_group
// channels, T taps of rb bytes, wg words per tap), in parallel over (group, row block, panel)
// units, and hands each unit's counts (rows x NR, row-major, free to overwrite) to
// store(g, panel, first_row, rows, counts). With one row block each panel is used once, so each
// unit builds its own in a thread-local buffer (no weight-sized allocation: a 1-row linear layer
// reads its weights once); else all panels are built first and shared by the row blocks.
template <class Store>
void bgemm(const Isa& isa, const uint64_t* A, int64_t lda, int64_t group_stride, int64_t M,
           int64_t groups, const uint8_t* bits, int64_t rows_per_group, int64_t T, int64_t rb,
           int64_t wg, const Store& store) {
  const int MR = isa.mr, NR = isa.nr;
  const int64_t MB = kBlockRows - kBlockRows % MR;
  const int64_t blocks = div_up(M, MB), P = div_up(rows_per_group, NR), L = T * wg;
  std::unique_ptr<uint64_t[]> shared;
  if (blocks > 1) shared = make_panels(bits, groups, rows_per_group, T, rb, wg, NR);
  at::parallel_for(0, groups * blocks * P, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> counts(static_cast<size_t>(MB) * NR);
    std::vector<uint64_t> own(shared ? 0 : static_cast<size_t>(L * NR));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u % P, block = (u / P) % blocks, g = u / (P * blocks);
      const uint64_t* panel;
      if (shared) {
        panel = shared.get() + (g * P + p) * L * NR;
      } else {
        build_panel(bits, g * rows_per_group + p * NR,
                    std::min<int64_t>(NR, rows_per_group - p * NR), T, rb, wg, NR, own.data());
        panel = own.data();
      }
      const uint64_t* a = A + g * group_stride;
      const int64_t m0 = block * MB, rows = std::min(M, m0 + MB) - m0;
      for (int64_t i = 0; i < rows; i += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, rows - i));
        isa.kernel(a + (m0 + i) * lda, lda, mr, panel, L, counts.data() + i * NR);
      }
      store(g, p, m0, rows, counts.data());
    }
  });
}

void check_scale_bias(const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                      int64_t out) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == out,
              "fxquant binary kernel: scale must be a contiguous float32 tensor of ", out,
              " values");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == out,
                "fxquant binary kernel: bias must be a contiguous float32 tensor of ", out,
                " values");
  }
}

// The valid taps of one output coordinate: [lo, hi) with 0 <= o * s - p + t * d < size.
void tap_range(int64_t o, int64_t s, int64_t p, int64_t d, int64_t k, int64_t size,
               int32_t* lo, int32_t* hi) {
  int64_t first = k, last = 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t pos = o * s - p + t * d;
    if (pos >= 0 && pos < size) {
      first = std::min(first, t);
      last = t + 1;
    }
  }
  *lo = static_cast<int32_t>(first < last ? first : 0);
  *hi = static_cast<int32_t>(first < last ? last : 0);
}

std::optional<at::Tensor> conv2d(const at::Tensor& x, const at::Tensor& weight_bits,
                                 const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                 std::vector<int64_t> dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "fxquant binary conv2d: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(weight_bits.dim() == 4 && weight_bits.scalar_type() == at::kByte &&
                  weight_bits.is_contiguous(),
              "fxquant binary conv2d: weight_bits must be a contiguous 4-D uint8 tensor");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && groups > 0,
              "fxquant binary conv2d: stride, padding and dilation take two values");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = weight_bits.size(0), KH = weight_bits.size(1), KW = weight_bits.size(2);
  TORCH_CHECK(C % groups == 0 && Cout % groups == 0, "fxquant binary conv2d: channels (", C,
              " in, ", Cout, " out) must divide by groups=", groups);
  const int64_t cg = C / groups, cout_g = Cout / groups, wg = div_up(cg, 64), rb = div_up(cg, 8);
  TORCH_CHECK(weight_bits.size(3) == rb, "fxquant binary conv2d: weight_bits rows hold ",
              weight_bits.size(3), " bytes, expected ", rb, " (ceil(", cg,
              " input channels per group / 8))");
  check_scale_bias(scale, bias, Cout);
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "fxquant binary conv2d: empty output");
  const Isa& isa = select_isa();

  std::vector<uint64_t> packed(static_cast<size_t>(N * H * W * groups * wg));
  if (!pack_conv_input(x, groups, cg, wg, packed.data())) return std::nullopt;

  const int64_t T = KH * KW, L = T * wg, OHW = OH * OW, M = N * OHW;
  const uint8_t* wb = weight_bits.data_ptr<uint8_t>();

  // Valid tap ranges per output row and column; padding exists where one is partial.
  std::vector<int32_t> row_lo(OH), row_hi(OH), col_lo(OW), col_hi(OW);
  bool any_border = false;
  for (int64_t o = 0; o < OH; ++o) {
    tap_range(o, sh, ph, dh, KH, H, &row_lo[o], &row_hi[o]);
    any_border |= row_lo[o] != 0 || row_hi[o] != KH;
  }
  for (int64_t o = 0; o < OW; ++o) {
    tap_range(o, sw, pw, dw, KW, W, &col_lo[o], &col_hi[o]);
    any_border |= col_lo[o] != 0 || col_hi[o] != KW;
  }
  std::vector<int32_t> prefix;
  if (any_border) prefix = tap_prefix_sums(wb, Cout, KH, KW, rb);
  const int64_t S = (KH + 1) * (KW + 1);

  // A: the packed input itself for a plain 1x1 convolution, else its im2col (G, M, L).
  const uint64_t* A = packed.data();
  int64_t lda = groups * wg, group_stride = wg;
  std::vector<uint64_t> cols;
  if (!(T == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0)) {
    cols.resize(static_cast<size_t>(groups * M * L));
    at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // one output row (n, oh) at a time
        const int64_t n = r / OH, oh = r % OH;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t m = r * OW + ow;
          for (int64_t g = 0; g < groups; ++g) {
            uint64_t* dst = cols.data() + (g * M + m) * L;
            const bool whole_rows = groups == 1 && dw == 1 && col_lo[ow] == 0 && col_hi[ow] == KW;
            for (int64_t i = 0; i < KH; ++i) {
              const int64_t ih = oh * sh - ph + i * dh;
              if (whole_rows && ih >= 0 && ih < H) {  // KW taps: consecutive input pixels
                const uint64_t* src = packed.data() + ((n * H + ih) * W + ow * sw - pw) * wg;
                for (int64_t k = 0; k < KW * wg; ++k) dst[k] = src[k];
                dst += KW * wg;
                continue;
              }
              for (int64_t j = 0; j < KW; ++j, dst += wg) {
                const int64_t iw = ow * sw - pw + j * dw;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
                  for (int64_t k = 0; k < wg; ++k) dst[k] = 0;
                } else {
                  const uint64_t* src = packed.data() + ((n * H + ih) * W + iw) * groups * wg;
                  for (int64_t k = 0; k < wg; ++k) dst[k] = src[g * wg + k];
                }
              }
            }
          }
        }
      }
    });
    A = cols.data();
    lda = L;
    group_stride = M * L;
  }

  at::Tensor out = at::empty({N, Cout, OH, OW}, x.options());
  float* op = out.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int NR = isa.nr;
  const int32_t dense = static_cast<int32_t>(T * cg);  // dot = dense - 2 * count, no padding
  bgemm(isa, A, lda, group_stride, M, groups, wb, cout_g, T, rb, wg,
        [&](int64_t g, int64_t p, int64_t m0, int64_t rows, int32_t* counts) {
          thread_local std::vector<int64_t> offset;
          offset.resize(static_cast<size_t>(rows));
          const int64_t o0 = g * cout_g + p * NR;
          const int64_t channels = std::min<int64_t>(NR, cout_g - p * NR);
          int64_t n = m0 / OHW, q = m0 % OHW, oh = q / OW, ow = q % OW;
          for (int64_t i = 0; i < rows; ++i) {  // counts -> dot products, in place
            if (i > 0) {  // step to pixel m0 + i without dividing
              ++q;
              if (++ow == OW) {
                ow = 0;
                if (++oh == OH) {
                  oh = q = 0;
                  ++n;
                }
              }
            }
            offset[i] = n * Cout * OHW + q;
            int32_t* c = counts + i * NR;
            const int32_t i0 = row_lo[oh], i1 = row_hi[oh], j0 = col_lo[ow], j1 = col_hi[ow];
            if (i0 == 0 && i1 == KH && j0 == 0 && j1 == KW) {
              for (int64_t j = 0; j < channels; ++j) c[j] = dense - 2 * c[j];
              continue;
            }
            // Padded taps held zero words, adding popcount(w) there: count only the valid
            // rectangle [i0, i1) x [j0, j1) of taps (2-D prefix sums of the tap counts).
            const int32_t W1 = static_cast<int32_t>(KW + 1);
            const int32_t taps = (i1 - i0) * (j1 - j0) * static_cast<int32_t>(cg);
            for (int64_t j = 0; j < channels; ++j) {
              const int32_t* pre = prefix.data() + (o0 + j) * S;
              const int32_t inside =
                  pre[i1 * W1 + j1] - pre[i0 * W1 + j1] - pre[i1 * W1 + j0] + pre[i0 * W1 + j0];
              c[j] = taps - 2 * (c[j] - (pre[KH * W1 + KW] - inside));
            }
          }
          store_planes(counts, NR, rows, channels, offset.data(), sp + o0,
                       bp == nullptr ? nullptr : bp + o0, op + o0 * OHW, OHW);
        });
  return out;
}

std::optional<at::Tensor> linear(const at::Tensor& x, const at::Tensor& weight_bits,
                                 const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "fxquant binary linear: x must be a float32 CPU tensor");
  TORCH_CHECK(weight_bits.dim() == 2 && weight_bits.scalar_type() == at::kByte &&
                  weight_bits.is_contiguous(),
              "fxquant binary linear: weight_bits must be a contiguous 2-D uint8 tensor");
  const int64_t K = x.size(-1), Out = weight_bits.size(0), words = div_up(K, 64);
  TORCH_CHECK(weight_bits.size(1) == div_up(K, 8), "fxquant binary linear: weight_bits rows hold ",
              weight_bits.size(1), " bytes, expected ", div_up(K, 8), " (ceil(", K,
              " features / 8))");
  check_scale_bias(scale, bias, Out);
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  TORCH_CHECK(M > 0 && K > 0 && Out > 0, "fxquant binary linear: empty input or weight");
  const Isa& isa = select_isa();

  std::vector<uint64_t> packed(static_cast<size_t>(M * words));
  if (!pack_rows(rows.data_ptr<float>(), M, K, words, packed.data())) return std::nullopt;

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = Out;
  at::Tensor out = at::empty(shape, x.options());
  float* op = out.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int NR = isa.nr;
  const int32_t k32 = static_cast<int32_t>(K);
  bgemm(isa, packed.data(), words, 0, M, 1, weight_bits.data_ptr<uint8_t>(), Out, 1,
        weight_bits.size(1), words,
        [&](int64_t, int64_t p, int64_t m0, int64_t rows, int32_t* counts) {
          const int64_t channels = std::min<int64_t>(NR, Out - p * NR);
          const float* s = sp + p * NR;
          for (int64_t i = 0; i < rows; ++i) {
            float* y = op + (m0 + i) * Out + p * NR;
            const int32_t* c = counts + i * NR;
            for (int64_t j = 0; j < channels; ++j) {
              y[j] = static_cast<float>(k32 - 2 * c[j]) * s[j];
            }
            if (bp != nullptr) {
              const float* b = bp + p * NR;
              for (int64_t j = 0; j < channels; ++j) y[j] = y[j] + b[j];
            }
          }
        });
  return out;
}

std::vector<std::string> isa_names() {
  std::vector<std::string> names;
  for (const Isa& isa : supported_isas()) names.emplace_back(isa.name);
  return names;
}

std::string selected_isa_name() { return select_isa().name; }

}  // namespace
}  // namespace fxquant

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fxquant packed binary kernels (xor + popcount); see fxquant/kernels/_native.py";
  m.def("conv2d", &fxquant::conv2d, "Binary conv2d on packed bits; None where x holds NaN",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear", &fxquant::linear, "Binary linear on packed bits; None where x holds NaN",
        py::call_guard<py::gil_scoped_release>());
  m.def("isas", &fxquant::isa_names, "Kernels this CPU can run, slowest first");
  m.def("selected_isa", &fxquant::selected_isa_name,
        "The kernel the next call uses (FXQUANT_BINARY_ISA or the fastest)");
}
