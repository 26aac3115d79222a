// Prefill regime (many activation rows): a shared-memory tiled product of int8 activations and
// the packed 2-bit weights with __dp4a; the weights are decoded in registers, never expanded.
//
// A block computes GEMM_TM activation rows x GEMM_TJ packed rows (4 * GEMM_TJ outputs), stepping
// over k in GEMM_TK-byte slices staged in shared memory. Thread (tx, ty) owns rows ty + 16i and
// packed rows tx + 16jj: 4 x 2 x 4 accumulators, each word of codes reused for 4 rows.
#include "common.cuh"
#include "ternary.cuh"

constexpr int GEMM_TK = 64;                     // bytes of k per step: 4 chunks of 16
constexpr int GEMM_TKW = GEMM_TK / 4;           // 32-bit words per step
constexpr int GEMM_RM = GEMM_TM / 16;           // rows per thread
constexpr int GEMM_RJ = GEMM_TJ / 16;           // packed rows per thread
static_assert(GEMM_THREADS == 256 && GEMM_TM % 16 == 0 && GEMM_TJ % 16 == 0,
              "16 x 16 threads; the loads below give each thread one 16-byte chunk");
static_assert(GEMM_TM * 4 == GEMM_THREADS && GEMM_TJ * 4 <= GEMM_THREADS, "one chunk a thread");

template <typename Out>
__device__ void bitlinear_gemm(const uint8_t* w,        // [r, k] packed codes
                               const int8_t* xq,        // [n_rows, k_pad] int8, zero past k
                               const float* scale,      // [n_rows] s_x
                               const int32_t* xq_sum,   // [n_rows] sum of each xq row
                               Out* y,                  // [n_rows, 4r]
                               int n_rows, int r, int k, int k_pad, float w_div) {
  // +1 word per row: the 16 threads of a half-warp read 16 different rows without bank conflicts.
  __shared__ int xs[GEMM_TM][GEMM_TKW + 1];
  __shared__ uint32_t ws[GEMM_TJ][GEMM_TKW + 1];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int t0 = blockIdx.y * GEMM_TM, j0 = blockIdx.x * GEMM_TJ;
  const bool vec = ((reinterpret_cast<uintptr_t>(w) | static_cast<uintptr_t>(k)) % 16) == 0;

  int acc[GEMM_RM][GEMM_RJ][TERNARY_FIELDS] = {};
  for (int k0 = 0; k0 < k; k0 += GEMM_TK) {
    {  // activations: GEMM_TM rows x 4 chunks = one 16-byte chunk per thread
      const int row = tid / 4, chunk = tid % 4, t = t0 + row, c = k0 + chunk * 16;
      int4 v = make_int4(0, 0, 0, 0);
      if (t < n_rows && c < k_pad) v = *reinterpret_cast<const int4*>(xq + static_cast<size_t>(t) * k_pad + c);
      xs[row][chunk * 4 + 0] = v.x;
      xs[row][chunk * 4 + 1] = v.y;
      xs[row][chunk * 4 + 2] = v.z;
      xs[row][chunk * 4 + 3] = v.w;
    }
    if (tid < GEMM_TJ * 4) {  // weights: GEMM_TJ packed rows x 4 chunks
      const int row = tid / 4, chunk = tid % 4, j = j0 + row, c = k0 + chunk * 16;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (j < r && c < k) {
        const uint8_t* p = w + static_cast<size_t>(j) * k + c;
        v = vec ? *reinterpret_cast<const uint4*>(p) : load16_guarded(p, k - c);
      }
      ws[row][chunk * 4 + 0] = v.x;
      ws[row][chunk * 4 + 1] = v.y;
      ws[row][chunk * 4 + 2] = v.z;
      ws[row][chunk * 4 + 3] = v.w;
    }
    __syncthreads();

#pragma unroll 4
    for (int kw = 0; kw < GEMM_TKW; ++kw) {
      int xv[GEMM_RM];
#pragma unroll
      for (int i = 0; i < GEMM_RM; ++i) xv[i] = xs[ty + 16 * i][kw];
#pragma unroll
      for (int jj = 0; jj < GEMM_RJ; ++jj) {
        const uint32_t wv = ws[tx + 16 * jj][kw];
#pragma unroll
        for (int f = 0; f < TERNARY_FIELDS; ++f) {
          const int codes = ternary_codes4(wv, f);
#pragma unroll
          for (int i = 0; i < GEMM_RM; ++i) acc[i][jj][f] = __dp4a(codes, xv[i], acc[i][jj][f]);
        }
      }
    }
    __syncthreads();  // the next slice overwrites xs and ws
  }

  const size_t out = static_cast<size_t>(TERNARY_FIELDS) * r;
#pragma unroll
  for (int i = 0; i < GEMM_RM; ++i) {
    const int t = t0 + ty + 16 * i;
    if (t >= n_rows) continue;
    const float s = scale[t];
    const int sum = xq_sum[t];
#pragma unroll
    for (int jj = 0; jj < GEMM_RJ; ++jj) {
      const int j = j0 + tx + 16 * jj;
      if (j >= r) continue;
#pragma unroll
      for (int f = 0; f < TERNARY_FIELDS; ++f) {
        store_out(y + t * out + ternary_out_row(j, f, r), acc[i][jj][f] - sum, s, w_div);
      }
    }
  }
}

#define GEMM_OP(NAME, OUT)                                                               \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS)                             \
      NAME(const uint8_t* w,         /* [r, k] */                                        \
           const int8_t* xq,         /* [n_rows, k_pad] */                               \
           const float* scale,       /* [n_rows] */                                      \
           const int32_t* xq_sum,    /* [n_rows] */                                      \
           OUT* y,                   /* [n_rows, 4r] */                                  \
           int n_rows, int r, int k, int k_pad, float w_div) {                           \
    bitlinear_gemm<OUT>(w, xq, scale, xq_sum, y, n_rows, r, k, k_pad, w_div);            \
  }

GEMM_OP(bitlinear_gemm_f32, float)
GEMM_OP(bitlinear_gemm_bf16, __nv_bfloat16)
GEMM_OP(bitlinear_gemm_f16, __half)
GEMM_OP(bitlinear_gemm_i32, int32_t)
