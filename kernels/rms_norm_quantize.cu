// RMSNorm straight into the int8 activations of the BitLinears that read it: one launch where
// candle needs ~10 ops and the quantize kernel one more. Writes the quantize kernel's outputs
// (codes, scale, row sum), which bitlinear_gemv/gemm take as they are.
//
// The arithmetic of ops::reference::rms_norm_quantize, bit for bit, per token row of k values:
//   ss   = sum of x^2 in a fixed order: RMS_NORM_THREADS strided partial sums (lane p adds
//          x[p], x[p + RMS_NORM_THREADS], ... in turn), then block_reduce_sum's tree
//   inv  = 1 / sqrt(ss / k + eps)                     (each step one IEEE f32 operation)
//   y    = T(w * T(x * inv))                          (transformers: cast, then times weight)
//   code = quantize_value(y, 127 / max(absmax(y), 1e-5))
// The relu2 flavour first forms x = T(T(relu(gate)^2) * up), as candle computes relu²(gate)·up,
// from a row [gate | up] of the fused gate/up mat-vec: the MLP's activation, its ffn_sub_norm
// and the quantization for down_proj in one launch.
#include "common.cuh"

template <typename T>
struct PlainRow {
  const T* x;
  __device__ __forceinline__ float operator()(int c) const { return to_float(x[c]); }
};

template <typename T>
struct Relu2MulRow {
  const T* gate;
  const T* up;
  __device__ __forceinline__ float operator()(int c) const {
    const float g = fmaxf(to_float(gate[c]), 0.0f);
    const float g2 = to_float(from_float<T>(__fmul_rn(g, g)));
    return to_float(from_float<T>(__fmul_rn(g2, to_float(up[c]))));
  }
};

// Calls f(i, c) for this thread's columns c < n, c = tid + i·RMS_NORM_THREADS, in order. With
// Cached the loop is unrolled over RMS_NORM_CACHED columns, so that the row's loads all issue
// at once and column i's value can stay in a register between the passes.
template <bool Cached, typename F>
__device__ __forceinline__ void each_column(int tid, int n, F f) {
  if constexpr (Cached) {
#pragma unroll
    for (int i = 0; i < RMS_NORM_CACHED; ++i) {
      const int c = tid + i * RMS_NORM_THREADS;
      if (c < n) f(i, c);
    }
  } else {
    for (int c = tid; c < n; c += RMS_NORM_THREADS) f(0, c);
  }
}

// Cached: rows of at most RMS_NORM_CACHED·RMS_NORM_THREADS columns (k_pad) read x once and keep
// each value in a register through the three passes, instead of reading the row three times
// (a latency chain of dependent passes: 8.6 µs for the relu2 flavour at k = 6912 on an H200).
template <typename T, typename Row, bool Cached>
__device__ void rms_norm_quantize(Row x,               // the row's values, in f32
                                  const T* weight,     // [k]
                                  int8_t* qr,          // [k_pad] this row's codes, zero past k
                                  float* scale,        // this row's s_x
                                  int32_t* xq_sum,     // this row's sum of codes
                                  int k, int k_pad, float eps) {
  const int tid = threadIdx.x;
  float v[Cached ? RMS_NORM_CACHED : 1] = {};
  float ss = 0.0f;
  each_column<Cached>(tid, k, [&](int i, int c) {
    const float xc = x(c);
    if constexpr (Cached) v[i] = xc;
    ss = __fadd_rn(ss, __fmul_rn(xc, xc));
  });
  ss = block_reduce_sum(ss);
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(k)), eps)));
  const auto normed = [&](int i, int c) {
    const float xc = Cached ? v[i] : x(c);
    const float t = to_float(from_float<T>(__fmul_rn(xc, inv)));
    return to_float(from_float<T>(__fmul_rn(to_float(weight[c]), t)));
  };

  float amax = 0.0f;
  each_column<Cached>(tid, k, [&](int i, int c) {
    const float y = normed(i, c);
    if constexpr (Cached) v[i] = y;
    amax = fmaxf(amax, fabsf(y));
  });
  amax = block_reduce_max(amax);
  const float s = activation_scale(amax);

  int sum = 0;
  each_column<Cached>(tid, k_pad, [&](int i, int c) {
    const int q = c < k ? quantize_value(Cached ? v[i] : normed(i, c), s) : 0;
    qr[c] = static_cast<int8_t>(q);
    sum += q;
  });
  sum = block_reduce_sum(sum);
  if (tid == 0) {
    *scale = s;
    *xq_sum = sum;
  }
}

template <typename T, typename Row>
__device__ void rms_norm_quantize_row(Row x, const T* weight, int8_t* qr, float* scale,
                                      int32_t* xq_sum, int k, int k_pad, float eps) {
  if (k_pad <= RMS_NORM_CACHED * RMS_NORM_THREADS) {
    rms_norm_quantize<T, Row, true>(x, weight, qr, scale, xq_sum, k, k_pad, eps);
  } else {
    rms_norm_quantize<T, Row, false>(x, weight, qr, scale, xq_sum, k, k_pad, eps);
  }
}

#define RMS_NORM_QUANTIZE_OP(NAME, T)                                                    \
  extern "C" __global__ void __launch_bounds__(RMS_NORM_THREADS)                         \
      NAME(const T* x,        /* [n_rows, k] */                                          \
           const T* weight,   /* [k] */                                                  \
           int8_t* xq,        /* [n_rows, k_pad] */                                      \
           float* scale,      /* [n_rows] */                                             \
           int32_t* xq_sum,   /* [n_rows] */                                             \
           int k, int k_pad, float eps) {                                                \
    const size_t row = blockIdx.x;                                                       \
    rms_norm_quantize_row<T>(PlainRow<T>{x + row * k}, weight, xq + row * k_pad, scale + row, \
                             xq_sum + row, k, k_pad, eps);                                 \
  }

#define RELU2_RMS_NORM_QUANTIZE_OP(NAME, T)                                              \
  extern "C" __global__ void __launch_bounds__(RMS_NORM_THREADS)                         \
      NAME(const T* gate_up,  /* [n_rows, 2k]: gate, then up */                          \
           const T* weight,   /* [k] */                                                  \
           int8_t* xq,        /* [n_rows, k_pad] */                                      \
           float* scale,      /* [n_rows] */                                             \
           int32_t* xq_sum,   /* [n_rows] */                                             \
           int k, int k_pad, float eps) {                                                \
    const T* gate = gate_up + 2 * static_cast<size_t>(blockIdx.x) * k;                   \
    const size_t row = blockIdx.x;                                                       \
    rms_norm_quantize_row<T>(Relu2MulRow<T>{gate, gate + k}, weight, xq + row * k_pad,   \
                             scale + row, xq_sum + row, k, k_pad, eps);                      \
  }

RMS_NORM_QUANTIZE_OP(rms_norm_quantize_f32, float)
RMS_NORM_QUANTIZE_OP(rms_norm_quantize_bf16, __nv_bfloat16)
RMS_NORM_QUANTIZE_OP(rms_norm_quantize_f16, __half)
RELU2_RMS_NORM_QUANTIZE_OP(relu2_rms_norm_quantize_f32, float)
RELU2_RMS_NORM_QUANTIZE_OP(relu2_rms_norm_quantize_bf16, __nv_bfloat16)
RELU2_RMS_NORM_QUANTIZE_OP(relu2_rms_norm_quantize_f16, __half)
