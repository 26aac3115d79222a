// Helpers shared by the BitLinear kernels: dtype conversions, the epilogue (the one place that
// rounds an i32 accumulator to the output dtype), block reductions and guarded loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

constexpr int WARP_SIZE = 32;
// Int8 activation rows are zero-padded to a multiple of this, so 16-byte loads need no tail.
constexpr int ACT_ALIGN = 16;
// quant::ACT_ABSMAX_EPS
constexpr float ACT_ABSMAX_EPS = 1e-5f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Round to nearest even, like half::{bf16, f16}::from_f32 on the CPU.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// quant::dequantize_accumulator, `acc as f32 / (w_div * act_scale)`: explicit _rn intrinsics so
// nvcc cannot contract or approximate, which keeps the result bit-identical to the CPU.
__device__ __forceinline__ float bitlinear_epilogue(int acc, float act_scale, float w_div) {
  return __fdiv_rn(__int2float_rn(acc), __fmul_rn(w_div, act_scale));
}

// Stores one output; the int32 flavour keeps the raw accumulator (for bit-exact tests).
template <typename Out>
__device__ __forceinline__ void store_out(Out* y, int acc, float act_scale, float w_div) {
  *y = from_float<Out>(bitlinear_epilogue(acc, act_scale, w_div));
}
template <>
__device__ __forceinline__ void store_out<int32_t>(int32_t* y, int acc, float, float) {
  *y = acc;
}

__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
  for (int off = WARP_SIZE / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ int warp_reduce_sum(int v) {
#pragma unroll
  for (int off = WARP_SIZE / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Max over the block, returned to every thread. blockDim.x must be a multiple of 32, <= 1024.
__device__ __forceinline__ float block_reduce_max(float v) {
  __shared__ float partial[WARP_SIZE];
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  v = warp_reduce_max(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / WARP_SIZE ? partial[lane] : 0.0f;
  v = warp_reduce_max(v);
  __syncthreads();  // partial[] may be reused by the caller's next reduction
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32, <= 1024.
__device__ __forceinline__ int block_reduce_sum(int v) {
  __shared__ int partial[WARP_SIZE];
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  v = warp_reduce_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / WARP_SIZE ? partial[lane] : 0;
  v = warp_reduce_sum(v);
  __syncthreads();
  return v;
}

// 16 bytes from p, of which only the first n_valid are read (the rest are 0): packed weight
// rows whose length or start is not 16-byte aligned, and the tail of a row.
__device__ __forceinline__ uint4 load16_guarded(const uint8_t* p, int n_valid) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    if (i < n_valid) w[i / 4] |= static_cast<uint32_t>(p[i]) << (8 * (i % 4));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
