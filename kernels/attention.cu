// Decode attention: one query token against the KV cache, all in f32 after loading T.
//
// Block (g, s) takes KV head g with its ATTN_MAX_GROUP-at-most query heads (GQA: each key and
// value row is loaded once for the group) over cache positions [s·split_len, (s+1)·split_len)
// of the first len. The queries are rotated here (rope_pair at position len - 1, as
// rope_kv_append rotated the keys). Each warp walks its positions with an online softmax
// (running max m, sum l, unnormalized output o); the warps then merge through shared memory.
// One split: the block writes y = o / l. Several (flash-decoding, long contexts): it writes
// (m, l, o) and attention_combine merges the splits, one block per query head.
//
// len_at, when not null, holds len in device memory instead (a decode step replayed from a CUDA
// graph): the grid is then sized for the cache's capacity, and splits past len write an
// empty (m = -inf, l = 0) result that the combine step weighs by zero.
//
// Not bit-exact with the CPU (exp, summation order): within 1e-5·max|V| plus one ulp of T of
// the exact result (tests/cuda_emulated.rs).
#include "common.cuh"
#include "rope.cuh"

constexpr int ATTN_WARPS = ATTN_THREADS / WARP_SIZE;
constexpr int ATTN_PER_LANE = ATTN_MAX_HEAD_DIM / WARP_SIZE;  // head elements per lane
static_assert(ATTN_THREADS % WARP_SIZE == 0 && ATTN_MAX_HEAD_DIM % WARP_SIZE == 0, "warps");

// Merges (m2, l2, o2) into (m, l, o): both rescaled to the larger max.
__device__ __forceinline__ float merge_weight(float m_from, float m_to) {
  return m_from == -INFINITY ? 0.0f : expf(m_from - m_to);
}

template <typename T>
__device__ void attention_decode(const T* qkv,    // [(n_h + 2 n_kv) hd]: this token's q, k, v
                                 const T* cache,  // [2, n_kv, cap, hd]
                                 const T* rope,   // [max_pos, hd]: cos | sin
                                 T* y,            // [n_h, hd] (one split)
                                 float* part,     // [n_h, splits, hd + 2]: m, l, o (several)
                                 int n_h, int n_kv, int hd, int cap, int len_arg,
                                 int split_len, float scale, const int* len_at) {
  const int len = len_at ? *len_at : len_arg;
  __shared__ float qs[ATTN_MAX_GROUP][ATTN_MAX_HEAD_DIM];
  __shared__ float ws_m[ATTN_WARPS][ATTN_MAX_GROUP], ws_l[ATTN_WARPS][ATTN_MAX_GROUP];
  __shared__ float ws_o[ATTN_WARPS][ATTN_MAX_GROUP][ATTN_MAX_HEAD_DIM];
  const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
  const int group = n_h / n_kv, kvh = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int half = hd / 2, pos = len - 1;
  const int p0 = split * split_len, p1 = p0 + split_len < len ? p0 + split_len : len;

  for (int i = tid; i < group * half; i += ATTN_THREADS) {
    const int r = i / half, d = i % half;
    const T* q = qkv + static_cast<size_t>(kvh * group + r) * hd;
    const T* cs = rope + static_cast<size_t>(pos) * hd;
    T q1, q2;
    rope_pair(q[d], q[d + half], cs[d], cs[half + d], &q1, &q2);
    qs[r][d] = to_float(q1);
    qs[r][d + half] = to_float(q2);
  }
  __syncthreads();

  const T* keys = cache + static_cast<size_t>(kvh) * cap * hd;
  const T* values = cache + (static_cast<size_t>(n_kv) + kvh) * cap * hd;
  float m[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP], o[ATTN_MAX_GROUP][ATTN_PER_LANE];
#pragma unroll
  for (int r = 0; r < ATTN_MAX_GROUP; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < ATTN_PER_LANE; ++i) o[r][i] = 0.0f;
  }
  for (int p = p0 + warp; p < p1; p += ATTN_WARPS) {
    float kv[ATTN_PER_LANE], vv[ATTN_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATTN_PER_LANE; ++i) {
      const int d = lane + i * WARP_SIZE;
      kv[i] = d < hd ? to_float(keys[static_cast<size_t>(p) * hd + d]) : 0.0f;
      vv[i] = d < hd ? to_float(values[static_cast<size_t>(p) * hd + d]) : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < ATTN_MAX_GROUP; ++r) {
      if (r < group) {  // the same for the whole block: every lane shuffles
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < ATTN_PER_LANE; ++i) {
          const int d = lane + i * WARP_SIZE;
          if (d < hd) dot = fmaf(qs[r][d], kv[i], dot);
        }
        const float s = warp_reduce_sum(dot) * scale;
        const float m_new = fmaxf(m[r], s);
        const float keep = merge_weight(m[r], m_new), w = expf(s - m_new);
        l[r] = l[r] * keep + w;
#pragma unroll
        for (int i = 0; i < ATTN_PER_LANE; ++i) o[r][i] = o[r][i] * keep + w * vv[i];
        m[r] = m_new;
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ATTN_MAX_GROUP; ++r) {
    if (r < group) {
      if (lane == 0) {
        ws_m[warp][r] = m[r];
        ws_l[warp][r] = l[r];
      }
#pragma unroll
      for (int i = 0; i < ATTN_PER_LANE; ++i) {
        const int d = lane + i * WARP_SIZE;
        if (d < hd) ws_o[warp][r][d] = o[r][i];
      }
    }
  }
  __syncthreads();

  for (int i = tid; i < group * hd; i += ATTN_THREADS) {
    const int r = i / hd, d = i % hd, h = kvh * group + r;
    float mx = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; ++w) mx = fmaxf(mx, ws_m[w][r]);
    float sum = 0.0f, out = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) {
      const float f = merge_weight(ws_m[w][r], mx);
      sum += ws_l[w][r] * f;
      out += ws_o[w][r][d] * f;
    }
    if (splits == 1) {
      y[static_cast<size_t>(h) * hd + d] = from_float<T>(out / sum);
    } else {
      float* pr = part + (static_cast<size_t>(h) * splits + split) * (hd + 2);
      if (d == 0) {
        pr[0] = mx;
        pr[1] = sum;
      }
      pr[2 + d] = out;
    }
  }
}

// Merges the splits of attention_decode: block h, query head h.
template <typename T>
__device__ void attention_combine(const float* part, T* y, int hd, int splits) {
  const int h = blockIdx.x;
  const float* ph = part + static_cast<size_t>(h) * splits * (hd + 2);
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ph[s * (hd + 2)]);
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s) sum += ph[s * (hd + 2) + 1] * merge_weight(ph[s * (hd + 2)], mx);
  for (int d = threadIdx.x; d < hd; d += ATTN_THREADS) {
    float out = 0.0f;
    for (int s = 0; s < splits; ++s) {
      out += ph[s * (hd + 2) + 2 + d] * merge_weight(ph[s * (hd + 2)], mx);
    }
    y[static_cast<size_t>(h) * hd + d] = from_float<T>(out / sum);
  }
}

#define ATTENTION_OP(NAME, COMBINE, T)                                                   \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                             \
      NAME(const T* qkv, const T* cache, const T* rope, T* y, float* part, int n_h,      \
           int n_kv, int hd, int cap, int len, int split_len, float scale,               \
           const int* len_at) {                                                          \
    attention_decode<T>(qkv, cache, rope, y, part, n_h, n_kv, hd, cap, len, split_len,   \
                        scale, len_at);                                                  \
  }                                                                                      \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                             \
      COMBINE(const float* part, T* y, int hd, int splits) {                             \
    attention_combine<T>(part, y, hd, splits);                                           \
  }

ATTENTION_OP(attention_decode_f32, attention_combine_f32, float)
ATTENTION_OP(attention_decode_bf16, attention_combine_bf16, __nv_bfloat16)
ATTENTION_OP(attention_decode_f16, attention_combine_f16, __half)
