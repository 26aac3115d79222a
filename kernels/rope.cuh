// The rotate_half RoPE of one pair of head elements, shared by the key append (rope_kv.cu) and
// the attention kernel, which rotates the query where it reads it.
#pragma once

#include "common.cuh"

// Elements d and d + hd/2 of a head rotated by (cos, sin): x1 cos - x2 sin, x1 sin + x2 cos,
// every operation rounded to T as half::bf16/f16 arithmetic (and plain f32) does.
template <typename T>
__device__ __forceinline__ void rope_pair(T x1, T x2, T c, T s, T* out1, T* out2) {
  const auto mul = [](T a, T b) { return to_float(from_float<T>(__fmul_rn(to_float(a), to_float(b)))); };
  *out1 = from_float<T>(__fsub_rn(mul(x1, c), mul(x2, s)));
  *out2 = from_float<T>(__fadd_rn(mul(x1, s), mul(x2, c)));
}
