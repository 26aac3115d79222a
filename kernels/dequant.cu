// Packed 2-bit weights to dense floats, value / w_div rounded like the CPU's
// `v as f32 / w_div`: the dense baseline and a test oracle, never on the BitLinear path.
#include "common.cuh"
#include "ternary.cuh"

// Grid-stride over packed bytes; each byte yields its 4 output rows.
template <typename T>
__device__ void dequant(const uint8_t* w,  // [r, k] packed codes
                        T* out,            // [4r, k]
                        int r, int k, float w_div) {
  const size_t n = static_cast<size_t>(r) * k;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i / k), c = static_cast<int>(i % k);
    const uint8_t p = w[i];
#pragma unroll
    for (int f = 0; f < TERNARY_FIELDS; ++f) {
      const float v = __fdiv_rn(static_cast<float>(ternary_value(p, f)), w_div);
      out[static_cast<size_t>(ternary_out_row(j, f, r)) * k + c] = from_float<T>(v);
    }
  }
}

#define DEQUANT_OP(NAME, T)                                                              \
  extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)                          \
      NAME(const uint8_t* w, /* [r, k] */ T* out, /* [4r, k] */ int r, int k, float w_div) { \
    dequant<T>(w, out, r, k, w_div);                                                     \
  }

DEQUANT_OP(dequant_f32, float)
DEQUANT_OP(dequant_bf16, __nv_bfloat16)
DEQUANT_OP(dequant_f16, __half)
