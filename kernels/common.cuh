// Shared device helpers: element conversions and fixed-order reductions.
// Every reduction here combines values in an order that depends only on the launch shape, so the
// same inputs give bit-identical results run to run.
#pragma once
#ifdef BARLOW_HOST_EMULATION
#include "cuda_host.h"  // tests/emulated: the kernels on the CPU, for tests without a GPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

namespace barlow {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// Rounds to the nearest TF32 value (10 mantissa bits, ties away from zero), kept in a float.
// Operands written this way pass through TF32 tensor cores unchanged, whether the hardware's own
// conversion rounds or truncates, so TF32 GEMM error stays unbiased.
__device__ __forceinline__ float round_tf32(float x) {
  if (!isfinite(x)) return x;
  return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xFFFFE000u);
}

// Column-tile geometry shared by the standardization kernels: a block covers COLS adjacent columns
// (one warp wide, so row reads are coalesced) and ROWS row-groups that split the batch.
constexpr int COLS = 32;
constexpr int ROWS = 8;

// Row-and-channel loops over an M×C row-major matrix for the elementwise kernels: rows spread over
// blockIdx.x·blockDim.y + threadIdx.y (grid-stride), channels over threadIdx.x (stride
// blockDim.x), so no element pays for a 64-bit division to find its channel.
#define BARLOW_FOR_ROWS(m, r)                                                   \
  for (int64_t r = (int64_t)blockIdx.x * blockDim.y + threadIdx.y; r < (m);     \
       r += (int64_t)gridDim.x * blockDim.y)
#define BARLOW_FOR_CHANNELS(c, ch) for (int64_t ch = threadIdx.x; ch < (c); ch += blockDim.x)

// Sums `v` over the block in a fixed tree order; the result is valid in thread 0.
// `scratch` must hold blockDim.x values of T.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int t = threadIdx.x;
  scratch[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) scratch[t] += scratch[t + s];
    __syncthreads();
  }
  T r = scratch[0];
  __syncthreads();
  return r;
}

}  // namespace barlow
