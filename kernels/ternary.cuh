// The 2-bit ternary decode: the GPU's single source of truth for the packed layout, which is
// documented in src/quant.rs and mirrored there by pack_ternary/unpack_ternary.
//
// W: [out, in] ternary is stored as P: [R, in] bytes with R = out/4. Byte P[j, c] holds the codes
// of W[k*R + j, c] for k = 0..4 in bits 2k..2k+1; code = value + 1 (0 -> -1, 1 -> 0, 2 -> +1).
#pragma once

#include <stdint.h>

// Output rows fed by one packed row: j, R + j, 2R + j, 3R + j.
constexpr int TERNARY_FIELDS = 4;

// Field k of one packed byte as its value in {-1, 0, 1}.
__device__ __forceinline__ int ternary_value(uint8_t packed, int k) {
  return static_cast<int>((packed >> (2 * k)) & 3u) - 1;
}

// Field k of four packed bytes (four columns) as four int8 codes in {0, 1, 2}: the weight
// operand of __dp4a. Codes are value + 1, so sum(code * x) - sum(x) = sum(value * x), exactly.
__device__ __forceinline__ int ternary_codes4(uint32_t packed4, int k) {
  return static_cast<int>((packed4 >> (2 * k)) & 0x03030303u);
}

// Output feature of field k of packed row j when there are r packed rows.
__device__ __forceinline__ int ternary_out_row(int j, int k, int r) { return k * r + j; }
