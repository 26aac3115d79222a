// RoPE of the new keys and their append to the KV cache, with the values, in one launch:
// candle needs a rope op per tensor, a cat per cache and copies.
//
// Block (b, t): b < n_kv rotates key head b of token t into K[b, pos0 + t]; b >= n_kv copies
// value head b - n_kv into V[b - n_kv, pos0 + t]. The rotation is candle's `rope`
// (rotate_half) on the CPU in T's arithmetic, bit for bit: each product and sum rounded to T.
// The queries are rotated where they are read, by the attention kernel (rope.cuh).
//
// pos0_at, when not null, holds pos0 in device memory instead: a decode step captured in a
// CUDA graph replays with the position written there before each launch.
#include "common.cuh"
#include "rope.cuh"

template <typename T>
__device__ void rope_kv_append(const T* qkv,      // [n_tok, (n_h + 2 n_kv) hd]
                               const T* rope,     // [max_pos, hd]: cos | sin, hd/2 each
                               T* cache,          // [2, n_kv, cap, hd]: K, then V
                               int n_h, int n_kv, int hd, int cap, int pos0_arg,
                               const int* pos0_at) {
  const int pos0 = pos0_at ? *pos0_at : pos0_arg;
  const int b = blockIdx.x, t = blockIdx.y, pos = pos0 + t, half = hd / 2;
  const T* src = qkv + static_cast<size_t>(t) * (n_h + 2 * n_kv) * hd + static_cast<size_t>(n_h + b) * hd;
  const int plane = b < n_kv ? 0 : 1, head = b < n_kv ? b : b - n_kv;
  T* dst = cache + ((static_cast<size_t>(plane) * n_kv + head) * cap + pos) * hd;
  if (plane == 1) {
    for (int d = threadIdx.x; d < hd; d += ROPE_THREADS) dst[d] = src[d];
    return;
  }
  const T* cs = rope + static_cast<size_t>(pos) * hd;
  for (int d = threadIdx.x; d < half; d += ROPE_THREADS) {
    rope_pair(src[d], src[d + half], cs[d], cs[half + d], dst + d, dst + d + half);
  }
}

#define ROPE_KV_OP(NAME, T)                                                              \
  extern "C" __global__ void __launch_bounds__(ROPE_THREADS)                             \
      NAME(const T* qkv, const T* rope, T* cache, int n_h, int n_kv, int hd, int cap,    \
           int pos0, const int* pos0_at) {                                               \
    rope_kv_append<T>(qkv, rope, cache, n_h, n_kv, hd, cap, pos0, pos0_at);              \
  }

ROPE_KV_OP(rope_kv_append_f32, float)
ROPE_KV_OP(rope_kv_append_bf16, __nv_bfloat16)
ROPE_KV_OP(rope_kv_append_f16, __half)
