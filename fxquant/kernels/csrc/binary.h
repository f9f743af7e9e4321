// Packed binary kernels: the interface between the driver (binary.cpp) and the micro-kernels.
//
// Bits: a +1 is bit 0, a -1 is bit 1, channels packed LSB first into 64-bit words (the stored
// weight rows are whole bytes, see fxquant/kernels/reference.py; the driver widens them to
// words, zero filled). For two rows of packed words,
// dot = K - 2 * popcount(a XOR w) over the K real channels (padding bits are 0 in both).
#pragma once

#include <cstdint>

namespace fxquant {

// counts[i * nr + j] = sum over k < words of popcount(a[i * lda + k] ^ panel[k * nr + j])
// for i < mr (mr <= the kernel's MR) and j < nr (the kernel's NR, the panel width).
using MicroKernel = void (*)(const uint64_t* a, int64_t lda, int mr, const uint64_t* panel,
                             int64_t words, int32_t* counts);

struct Isa {
  const char* name;    // "portable", "popcnt", "avx2", "avx512"
  int mr;              // rows (pixels) per micro-tile
  int nr;              // output channels per weight panel
  MicroKernel kernel;  // nullptr where the kernel was not compiled (non-x86)
};

// One per translation unit, each compiled for its instruction set (see kernel_*.cpp).
Isa isa_portable();
Isa isa_popcnt();
Isa isa_avx2();
Isa isa_avx512();

}  // namespace fxquant
