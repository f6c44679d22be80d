// The loss's standardization kernels: Ẑ = (Z − mean)·rstd per column, and its backward pass.
#include "loss/standardize.cuh"

#define BARLOW_STD_FWD(NAME, IN, OUT)                                                        \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS) NAME(            \
      const IN* z, OUT* zhat, float* stats, int64_t n, int64_t d, float eps, int tf32) {      \
    barlow::standardize_fwd<IN, OUT>(z, zhat, stats, n, d, eps, tf32);                       \
  }
BARLOW_STD_FWD(standardize_fwd_f32_f32, float, float)
BARLOW_STD_FWD(standardize_fwd_bf16_f32, __nv_bfloat16, float)
BARLOW_STD_FWD(standardize_fwd_f16_f32, __half, float)
BARLOW_STD_FWD(standardize_fwd_f32_bf16, float, __nv_bfloat16)
BARLOW_STD_FWD(standardize_fwd_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
BARLOW_STD_FWD(standardize_fwd_f16_bf16, __half, __nv_bfloat16)

#define BARLOW_STD_BWD(NAME, T)                                                              \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS) NAME(            \
      const float* g, const T* z, const float* stats, T* dz, int64_t n, int64_t d) {         \
    barlow::standardize_bwd<float, T>(g, (const T*)nullptr, z, stats, nullptr, dz, nullptr,  \
                                      nullptr, n, d);                                        \
  }
BARLOW_STD_BWD(standardize_bwd_f32, float)
BARLOW_STD_BWD(standardize_bwd_bf16, __nv_bfloat16)
BARLOW_STD_BWD(standardize_bwd_f16, __half)
