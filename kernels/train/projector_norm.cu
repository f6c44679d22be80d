// The projector's batch norm: the loss's standardization with an affine, an optional ReLU and
// running statistics (see loss/standardize.cuh).
#include "loss/standardize.cuh"

#define BARLOW_STD_AFFINE(NAME_FWD, NAME_BWD, T)                                              \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS) NAME_FWD(        \
      const T* z, T* y, float* stats, int64_t n, int64_t d, float eps, const float* gamma,    \
      const float* beta, int relu, float momentum, float* running_mean, float* running_var) { \
    barlow::standardize_fwd<T, T>(                                                           \
        z, y, stats, n, d, eps, 0,                                                           \
        barlow::Affine{gamma, beta, relu, momentum, running_mean, running_var});             \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS) NAME_BWD(        \
      const T* dy, const T* y, const T* z, const float* stats, const float* gamma, T* dz,     \
      float* dgamma, float* dbeta, int64_t n, int64_t d) {                                    \
    barlow::standardize_bwd<T, T>(dy, y, z, stats, gamma, dz, dgamma, dbeta, n, d);          \
  }
BARLOW_STD_AFFINE(standardize_affine_fwd_f32, standardize_affine_bwd_f32, float)
BARLOW_STD_AFFINE(standardize_affine_fwd_bf16, standardize_affine_bwd_bf16, __nv_bfloat16)
