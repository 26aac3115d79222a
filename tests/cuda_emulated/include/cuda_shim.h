// A CPU stand-in for the parts of CUDA that kernels/*.cu use, so that those files compile
// unmodified with a host C++20 compiler (this directory goes first on the include path) and
// run in tests/cuda_emulated.rs, on machines without a GPU.
//
// Every CUDA thread of a block is a real std::thread, because the kernels are written as
// per-thread code with block- and warp-wide synchronization in the middle of it (reductions,
// shared-memory tiles): only a thread of its own can stop at __syncthreads() or
// __shfl_xor_sync() and resume there. Blocks run one after another, each on the same
// blockDim.x threads.
//
// Emulated: threadIdx/blockIdx/blockDim/gridDim (1-D blocks, 2-D grids), __shared__ (one
// static per kernel, which is right while only one block runs at a time), __syncthreads (a
// barrier of the whole block), __shfl_xor_sync over full warps, __dp4a, the float/int/bf16/f16
// conversion intrinsics the kernels use, and 16-byte uint4/int4 loads, which abort when not
// 16-byte aligned, as they would fault on the GPU. The driver puts a guard page right after
// each buffer, so reading or writing past its end crashes.
// expf is the host's (the device's differs by an ulp or two: the attention test has a tolerance).
// Not emulated: the GPU memory model (a barrier here orders all memory), warps in lockstep
// (lanes only meet at shuffles; a shuffle or __syncthreads that not all threads reach hangs,
// which the test turns into a timeout), shared memory starting as garbage (it keeps the
// previous block's values), nvcc contracting plain a * b + c into an FMA (the kernels use _rn
// intrinsics where rounding matters), occupancy, timing, and any intrinsic not declared below
// (a kernel using one fails to compile here: the signal to add it).
#pragma once

#include <math.h>  // fabsf, fmaxf, fminf, rintf, sqrtf: round like the device ones; expf, fmaf
#include <stdint.h>
#include <string.h>

#include <functional>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(max_threads)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

void shim_fail(const char* what);  // prints `what` and aborts

// uint4/int4. A kernel's `*reinterpret_cast<const uint4*>(p)` lands in the copy constructor
// or assignment, which checks the 16-byte alignment that the GPU requires before it reads anything. (Not
// alignas(16): the host compiler could then emit aligned loads that crash before the check.)
template <typename T>
struct vec4 {
  T x, y, z, w;
  vec4() = default;
  vec4(T x, T y, T z, T w) : x(x), y(y), z(z), w(w) {}
  // From a temporary (make_uint4, a function's result): not a memory load, nothing to check.
  vec4(vec4&& o) : x(o.x), y(o.y), z(o.z), w(o.w) {}
  vec4& operator=(vec4&& o) {
    x = o.x, y = o.y, z = o.z, w = o.w;
    return *this;
  }
  vec4(const vec4& o) { *this = o; }
  vec4& operator=(const vec4& o) {
    if (reinterpret_cast<uintptr_t>(&o) % 16 != 0) {
      shim_fail("misaligned 16-byte vector load");
    }
    x = o.x, y = o.y, z = o.z, w = o.w;
    return *this;
  }
};
using uint4 = vec4<uint32_t>;
using int4 = vec4<int>;
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

// bf16 and f16 as their bit patterns; conversions round to nearest even, as on the device.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};  // NaN: CUDA's canonical one
  u += 0x7fffu + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}
// By hand rather than with _Float16, which not every host compiler has.
inline float __half2float(__half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16, e = (v.bits >> 10) & 0x1f,
                 m = v.bits & 0x3ffu;
  if (e == 0) return copysignf(ldexpf(float(m), -24), sign ? -1.0f : 1.0f);  // subnormal, 0
  const uint32_t u = sign | (e == 31 ? 0x7f800000u : (e + 112) << 23) | (m << 13);
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {uint16_t(sign | 0x7e00u | (a >> 13))};  // NaN, kept quiet
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // from 65520 (a tie, odd) on: inf
  if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, the exact scaling rounded by rintf
    return {uint16_t(sign | uint32_t(rintf(fabsf(f) * 16777216.0f)))};
  }
  uint32_t h = (a - 0x38000000u) >> 13;  // exponent rebiased from 127 to 15, 10 mantissa bits
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;  // to nearest even; may carry into
  return {uint16_t(sign | h)};                                // the exponent, rightly
}

// Single IEEE operations; the test compiles with -ffp-contract=off so nothing fuses them.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __int2float_rn(int v) { return float(v); }

// c + the dot product of the four signed bytes of a and of b.
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return c;
}

void __syncthreads();
uint32_t shfl_xor_bits(uint32_t mask, uint32_t bits, int lane_mask);
template <typename T>
T __shfl_xor_sync(uint32_t mask, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t bits;
  memcpy(&bits, &v, 4);
  bits = shfl_xor_bits(mask, bits, lane_mask);
  memcpy(&v, &bits, 4);
  return v;
}

// Runs `kernel` (a call of an extern "C" kernel with its arguments) on every thread of every
// block of the grid; returns when all blocks are done.
void launch(dim3 grid, dim3 block, const std::function<void()>& kernel);
