// Decode regime (1-8 activation rows): packed 2-bit weights times int8 activations with __dp4a,
// exact i32 accumulation, both scales applied in the epilogue, optionally added to a residual.
//
// One block per packed row j: its GEMV_THREADS threads (several warps) split the row's 16-byte
// chunks, each thread loading GEMV_UNROLL chunks before using the first, so that a row is
// requested at once. One weight load feeds 4 outputs x n_rows rows. A warp reduction, one
// through shared memory, and thread 4t + f writes output f of row t.
//
// Up to three weight matrices stacked along the packed rows (q/k/v, or gate/up) run as one
// launch on one quantized input: segment s holds packed rows [start_s, end_s) of its own matrix,
// with its own w_div, and its outputs land in columns [4 start_s, 4 end_s) of each output row.
//
// ptxas -v (nvcc 13.0, sm_90), no spills: bitlinear_gemv1_* 40 registers, 64 B shared (12
// blocks = 48 warps per SM by registers); bitlinear_gemv_* 70 registers, 512 B (7 blocks, 28
// warps). Batch-1 decode of 2B-4T on an H200 (132 SMs, 4 loads per thread in flight):
//   q/k/v stacked  r = 960,  k = 2560: 7.3 blocks per SM, one wave; a block requests its whole
//                  2560-byte row at once (160 chunks over 128 threads), ~19 KB per SM in flight
//   o_proj         r = 640,  k = 2560: 4.8 blocks per SM, one wave, ~12 KB per SM
//   gate/up        r = 3456, k = 2560: 26 blocks per SM, 2.2 waves
//   down_proj      r = 640,  k = 6912: 4.8 blocks per SM, 3-4 loads per thread, ~33 KB per SM
#include "common.cuh"
#include "ternary.cuh"

static_assert(GEMV_THREADS % WARP_SIZE == 0 && GEMV_THREADS >= GEMV_MAX_ROWS * TERNARY_FIELDS,
              "whole warps, and a thread for each output of the row");

// Output column of field f of packed row j, with the segment's w_div.
struct GemvSegment {
  int col;
  float w_div;
};

__device__ __forceinline__ GemvSegment gemv_segment(int j, int f, int r, int end0, int end1,
                                                    float w_div0, float w_div1, float w_div2) {
  const int start = j < end0 ? 0 : j < end1 ? end0 : end1;
  const int end = j < end0 ? end0 : j < end1 ? end1 : r;
  const float w_div = j < end0 ? w_div0 : j < end1 ? w_div1 : w_div2;
  return {TERNARY_FIELDS * start + ternary_out_row(j - start, f, end - start), w_div};
}

// MAX_ROWS: GEMV_MAX_ROWS, or 1 for batch-1 decode (4 accumulators instead of 32 per thread).
template <typename Out, int MAX_ROWS>
__device__ void bitlinear_gemv(const uint8_t* w,        // [r, k] packed codes
                               const int8_t* xq,        // [n_rows, k_pad] int8, zero past k
                               const float* scale,      // [n_rows] s_x
                               const int32_t* xq_sum,   // [n_rows] sum of each xq row
                               Out* y,                  // [n_rows, 4r]
                               const Out* residual,     // [n_rows, 4r] added to y, or null
                               int n_rows, int r, int k, int k_pad,
                               int end0, int end1,      // segments [0, end0) [end0, end1) [end1, r)
                               float w_div0, float w_div1, float w_div2) {
  __shared__ int partial[GEMV_THREADS / WARP_SIZE][MAX_ROWS * TERNARY_FIELDS];
  const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
  const int j = blockIdx.x;

  const uint8_t* wj = w + static_cast<size_t>(j) * k;
  // 16-byte weight loads need every row start aligned: k % 16 == 0 and an aligned base.
  const bool vec = ((reinterpret_cast<uintptr_t>(w) | static_cast<uintptr_t>(k)) % 16) == 0;
  const int n_chunks = (k + 15) / 16;

  int acc[MAX_ROWS][TERNARY_FIELDS] = {};
  for (int base = tid; base < n_chunks; base += GEMV_THREADS * GEMV_UNROLL) {
    uint4 wv[GEMV_UNROLL];
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {  // all loads first: GEMV_UNROLL in flight
      const int c = (base + u * GEMV_THREADS) * 16;
      wv[u] = make_uint4(0, 0, 0, 0);
      if (c < k) wv[u] = vec ? *reinterpret_cast<const uint4*>(wj + c) : load16_guarded(wj + c, k - c);
    }
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
      const int c = (base + u * GEMV_THREADS) * 16;
      const uint32_t ww[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
      for (int t = 0; t < MAX_ROWS; ++t) {
        if (t < n_rows && c < k) {  // (no break: the loop must unroll to keep wv in registers)
          // c < k_pad, which is a multiple of 16: always a full, aligned chunk.
          const int4 xv = *reinterpret_cast<const int4*>(xq + static_cast<size_t>(t) * k_pad + c);
          const int xx[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int f = 0; f < TERNARY_FIELDS; ++f) {
              acc[t][f] = __dp4a(ternary_codes4(ww[i], f), xx[i], acc[t][f]);
            }
          }
        }
      }
    }
  }

  // n_rows is the same for the whole block: every lane reaches every shuffle.
#pragma unroll
  for (int t = 0; t < MAX_ROWS; ++t) {
    if (t < n_rows) {
#pragma unroll
      for (int f = 0; f < TERNARY_FIELDS; ++f) {
        const int v = warp_reduce_sum(acc[t][f]);
        if (lane == 0) partial[warp][t * TERNARY_FIELDS + f] = v;
      }
    }
  }
  __syncthreads();

  if (tid < n_rows * TERNARY_FIELDS) {
    const int t = tid / TERNARY_FIELDS, f = tid % TERNARY_FIELDS;
    int sum = 0;
#pragma unroll
    for (int i = 0; i < GEMV_THREADS / WARP_SIZE; ++i) sum += partial[i][tid];
    const GemvSegment seg = gemv_segment(j, f, r, end0, end1, w_div0, w_div1, w_div2);
    const size_t at = static_cast<size_t>(t) * TERNARY_FIELDS * r + seg.col;
    store_out_residual(y + at, residual ? residual + at : nullptr, sum - xq_sum[t], scale[t],
                       seg.w_div);
  }
}

#define GEMV_OP(NAME, OUT, MAX_ROWS)                                                     \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                             \
      NAME(const uint8_t* w,         /* [r, k] */                                        \
           const int8_t* xq,         /* [n_rows, k_pad] */                               \
           const float* scale,       /* [n_rows] */                                      \
           const int32_t* xq_sum,    /* [n_rows] */                                      \
           OUT* y,                   /* [n_rows, 4r] */                                  \
           const OUT* residual,      /* [n_rows, 4r] or null */                          \
           int n_rows, int r, int k, int k_pad, int end0, int end1,                      \
           float w_div0, float w_div1, float w_div2) {                                   \
    bitlinear_gemv<OUT, MAX_ROWS>(w, xq, scale, xq_sum, y, residual, n_rows, r, k, k_pad, end0, end1, \
                        w_div0, w_div1, w_div2);                                         \
  }

GEMV_OP(bitlinear_gemv_f32, float, GEMV_MAX_ROWS)
GEMV_OP(bitlinear_gemv_bf16, __nv_bfloat16, GEMV_MAX_ROWS)
GEMV_OP(bitlinear_gemv_f16, __half, GEMV_MAX_ROWS)
GEMV_OP(bitlinear_gemv_i32, int32_t, GEMV_MAX_ROWS)
GEMV_OP(bitlinear_gemv1_f32, float, 1)
GEMV_OP(bitlinear_gemv1_bf16, __nv_bfloat16, 1)
GEMV_OP(bitlinear_gemv1_f16, __half, 1)
GEMV_OP(bitlinear_gemv1_i32, int32_t, 1)
