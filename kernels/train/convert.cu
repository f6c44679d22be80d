// Element conversions between the f32 master copies and the bf16 working copies.
#include "common.cuh"

// dst = bf16(src): the working copy of the weights.
extern "C" __global__ void cast_f32_bf16(const float* src, __nv_bfloat16* dst, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}

// dst += src: an f32 weight gradient (one view) accumulated into the master gradient.
extern "C" __global__ void accumulate_f32_f32(const float* src, float* dst, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    dst[i] += src[i];
}

// dst += src: a bf16 weight gradient (one view) accumulated into the f32 master gradient.
extern "C" __global__ void accumulate_bf16_f32(const __nv_bfloat16* src, float* dst, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    dst[i] += __bfloat162float(src[i]);
}
