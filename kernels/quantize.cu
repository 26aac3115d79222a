// Per-token absmax int8 activation quantization, bit-identical to quant::quantize_activations:
// s = 127 / max(absmax, 1e-5), q = clamp(round_half_even(x * s), -128, 127).
#include "common.cuh"

// One block per row. Q is int8_t for the BitLinear pipeline, int32_t for tests (its poison
// value is then out of the int8 range).
template <typename T, typename Q>
__device__ void quantize_rows(const T* x,         // [n_rows, k]
                              Q* xq,              // [n_rows, k_pad], zero past k
                              float* scale,       // [n_rows] s_x
                              int32_t* xq_sum,    // [n_rows] sum of the row of xq
                              int k, int k_pad) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * k;
  Q* qr = xq + row * k_pad;

  float amax = 0.0f;
  for (int c = threadIdx.x; c < k; c += blockDim.x) amax = fmaxf(amax, fabsf(to_float(xr[c])));
  amax = block_reduce_max(amax);
  const float s = activation_scale(amax);

  int sum = 0;
  for (int c = threadIdx.x; c < k_pad; c += blockDim.x) {
    const int q = c < k ? quantize_value(to_float(xr[c]), s) : 0;
    qr[c] = static_cast<Q>(q);
    sum += q;
  }
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) {
    scale[row] = s;
    xq_sum[row] = sum;
  }
}

#define QUANTIZE_OP(NAME, T, Q)                                                          \
  extern "C" __global__ void __launch_bounds__(QUANTIZE_THREADS)                         \
      NAME(const T* x,       /* [n_rows, k] */                                           \
           Q* xq,            /* [n_rows, k_pad] */                                       \
           float* scale,     /* [n_rows] */                                              \
           int32_t* xq_sum,  /* [n_rows] */                                              \
           int k, int k_pad) {                                                           \
    quantize_rows<T, Q>(x, xq, scale, xq_sum, k, k_pad);                                 \
  }

QUANTIZE_OP(quantize_i8_f32, float, int8_t)
QUANTIZE_OP(quantize_i8_bf16, __nv_bfloat16, int8_t)
QUANTIZE_OP(quantize_i8_f16, __half, int8_t)
QUANTIZE_OP(quantize_i32_f32, float, int32_t)
QUANTIZE_OP(quantize_i32_bf16, __nv_bfloat16, int32_t)
QUANTIZE_OP(quantize_i32_f16, __half, int32_t)
