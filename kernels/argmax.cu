// Greedy decoding's argmax on the device: per row of logits, the FIRST index of the largest
// value, as torch and the CPU pick (candle's CUDA argmax returns the last of equal maxima).
// NaN never wins; a row of NaN gives 0. One block per row.
#include "common.cuh"

// (v, i) becomes the better of itself and (v2, i2): larger value, then smaller index.
__device__ __forceinline__ void keep_first_max(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

template <typename T>
__device__ void argmax_rows(const T* x, uint32_t* out, int n) {
  __shared__ float best_v[ARGMAX_THREADS / WARP_SIZE];
  __shared__ int best_i[ARGMAX_THREADS / WARP_SIZE];
  const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
  const T* row = x + static_cast<size_t>(blockIdx.x) * n;
  float v = -INFINITY;
  int i = n;  // none yet: loses every tie with a real index
  for (int c = tid; c < n; c += ARGMAX_THREADS) keep_first_max(v, i, to_float(row[c]), c);
#pragma unroll
  for (int off = WARP_SIZE / 2; off > 0; off /= 2) {
    keep_first_max(v, i, __shfl_xor_sync(0xffffffffu, v, off), __shfl_xor_sync(0xffffffffu, i, off));
  }
  if (lane == 0) {
    best_v[warp] = v;
    best_i[warp] = i;
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < ARGMAX_THREADS / WARP_SIZE; ++w) keep_first_max(v, i, best_v[w], best_i[w]);
    out[blockIdx.x] = i == n ? 0u : static_cast<uint32_t>(i);
  }
}

#define ARGMAX_OP(NAME, T)                                                               \
  extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)                           \
      NAME(const T* x, /* [n_rows, n] */ uint32_t* out, /* [n_rows] */ int n) {          \
    argmax_rows<T>(x, out, n);                                                           \
  }

ARGMAX_OP(argmax_f32, float)
ARGMAX_OP(argmax_bf16, __nv_bfloat16)
ARGMAX_OP(argmax_f16, __half)
