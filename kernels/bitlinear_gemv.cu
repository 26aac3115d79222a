// Decode regime (1-8 activation rows): packed 2-bit weights times int8 activations with __dp4a,
// exact i32 accumulation, both scales applied in the epilogue.
//
// One warp per packed row j: each lane walks 16-byte column chunks of P[j, :] and of every
// activation row, so one weight load feeds 4 outputs x n_rows rows. Then a warp reduction, and
// lane 4t + f writes output f of row t.
#include "common.cuh"
#include "ternary.cuh"

constexpr int GEMV_MAX_ROWS = 8;  // 4 * GEMV_MAX_ROWS outputs = one per lane
constexpr int GEMV_WARPS = 4;     // packed rows per block

template <typename Out>
__device__ void bitlinear_gemv(const uint8_t* w,        // [r, k] packed codes
                               const int8_t* xq,        // [n_rows, k_pad] int8, zero past k
                               const float* scale,      // [n_rows] s_x
                               const int32_t* xq_sum,   // [n_rows] sum of each xq row
                               Out* y,                  // [n_rows, 4r]
                               int n_rows, int r, int k, int k_pad, float w_div) {
  const int lane = threadIdx.x % WARP_SIZE;
  const int j = blockIdx.x * GEMV_WARPS + threadIdx.x / WARP_SIZE;
  if (j >= r) return;  // whole warps only; nothing below synchronizes the block

  const uint8_t* wj = w + static_cast<size_t>(j) * k;
  // 16-byte weight loads need every row start aligned: k % 16 == 0 and an aligned base.
  const bool vec = ((reinterpret_cast<uintptr_t>(w) | static_cast<uintptr_t>(k)) % 16) == 0;
  const int n_chunks = (k + 15) / 16;

  int acc[GEMV_MAX_ROWS][TERNARY_FIELDS] = {};
  for (int ch = lane; ch < n_chunks; ch += WARP_SIZE) {
    const int c = ch * 16;
    const uint4 wv = vec ? *reinterpret_cast<const uint4*>(wj + c) : load16_guarded(wj + c, k - c);
    const uint32_t ww[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int t = 0; t < GEMV_MAX_ROWS; ++t) {
      if (t < n_rows) {
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

#pragma unroll
  for (int t = 0; t < GEMV_MAX_ROWS; ++t) {
    if (t < n_rows) {
#pragma unroll
      for (int f = 0; f < TERNARY_FIELDS; ++f) acc[t][f] = warp_reduce_sum(acc[t][f]);
    }
  }

  const int out = TERNARY_FIELDS * r;
#pragma unroll
  for (int t = 0; t < GEMV_MAX_ROWS; ++t) {
#pragma unroll
    for (int f = 0; f < TERNARY_FIELDS; ++f) {
      if (t < n_rows && lane == t * TERNARY_FIELDS + f) {
        store_out(y + static_cast<size_t>(t) * out + ternary_out_row(j, f, r),
                  acc[t][f] - xq_sum[t], scale[t], w_div);
      }
    }
  }
}

#define GEMV_OP(NAME, OUT)                                                               \
  extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP_SIZE)                   \
      NAME(const uint8_t* w,         /* [r, k] */                                        \
           const int8_t* xq,         /* [n_rows, k_pad] */                               \
           const float* scale,       /* [n_rows] */                                      \
           const int32_t* xq_sum,    /* [n_rows] */                                      \
           OUT* y,                   /* [n_rows, 4r] */                                  \
           int n_rows, int r, int k, int k_pad, float w_div) {                           \
    bitlinear_gemv<OUT>(w, xq, scale, xq_sum, y, n_rows, r, k, k_pad, w_div);            \
  }

GEMV_OP(bitlinear_gemv_f32, float)
GEMV_OP(bitlinear_gemv_bf16, __nv_bfloat16)
GEMV_OP(bitlinear_gemv_f16, __half)
GEMV_OP(bitlinear_gemv_i32, int32_t)
