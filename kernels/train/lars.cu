// LARS over every parameter of the model in three launches. Parameters, gradients and momentum are
// each one flat f32 array; the host splits every tensor into chunks of at most a block's worth of
// work and passes the chunk table (start, length, tensor) and each tensor's first chunk, chunk
// count and kind (a 1-D parameter skips weight decay and the trust ratio).
//
//   1. lars_partial: per chunk, Σw² and Σd² with d = g (+ wd·w), in a fixed tree order.
//   2. lars_trust:   per tensor, sums its chunks in order (f64) into η‖w‖/‖d‖, or 1.
//   3. lars_update:  per chunk, d = (g + wd·w)·trust, μ = m·μ + d, w −= lr·μ, and the bf16 working
//                    copy of w (bf16 or f32) that the convolutions and GEMMs read.
#include "common.cuh"

namespace barlow {
constexpr int LARS_THREADS = 256;
}

extern "C" __global__ void __launch_bounds__(barlow::LARS_THREADS)
    lars_partial(const float* w, const float* g, const int64_t* chunk_start,
                 const int* chunk_len, const int* chunk_tensor, const int* tensor_vector, float wd,
                 float* partial) {
  __shared__ float scratch[barlow::LARS_THREADS];
  const int64_t k = blockIdx.x;
  const int64_t s = chunk_start[k];
  const int len = chunk_len[k];
  const float decay = tensor_vector[chunk_tensor[k]] ? 0.f : wd;
  float ww = 0.f, dd = 0.f;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const float wi = w[s + i];
    const float di = g[s + i] + decay * wi;
    ww += wi * wi;
    dd += di * di;
  }
  ww = barlow::block_sum(ww, scratch);
  dd = barlow::block_sum(dd, scratch);
  if (threadIdx.x == 0) {
    partial[2 * k] = ww;
    partial[2 * k + 1] = dd;
  }
}

extern "C" __global__ void lars_trust(const float* partial, const int* first_chunk,
                                      const int* n_chunks, const int* tensor_vector,
                                      int64_t tensors, float eta, float* trust) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tensors) return;
  if (tensor_vector[t]) {
    trust[t] = 1.f;
    return;
  }
  double ww = 0.0, dd = 0.0;
  for (int k = first_chunk[t]; k < first_chunk[t] + n_chunks[t]; ++k) {
    ww += partial[2 * k];
    dd += partial[2 * k + 1];
  }
  const double pn = sqrt(ww), un = sqrt(dd);
  trust[t] = (pn > 0.0 && un > 0.0) ? (float)((double)eta * pn / un) : 1.f;
}

namespace barlow {
template <typename T>
__device__ void lars_update(float* w, const float* g, float* mom, const int64_t* chunk_start,
                            const int* chunk_len, const int* chunk_tensor,
                            const int* tensor_vector, const float* trust, float wd,
                            float lr_weights, float lr_biases, float momentum, T* work) {
  const int64_t k = blockIdx.x;
  const int64_t s = chunk_start[k];
  const int len = chunk_len[k];
  const int t = chunk_tensor[k];
  const bool vec = tensor_vector[t] != 0;
  const float decay = vec ? 0.f : wd;
  const float q = trust[t];
  const float lr = vec ? lr_biases : lr_weights;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const int64_t j = s + i;
    const float d = (g[j] + decay * w[j]) * q;
    const float m = momentum * mom[j] + d;
    mom[j] = m;
    const float nw = w[j] - lr * m;
    w[j] = nw;
    work[j] = from_f32<T>(nw);
  }
}
}  // namespace barlow

#define BARLOW_LARS_UPDATE(SUF, T)                                                               \
  extern "C" __global__ void __launch_bounds__(barlow::LARS_THREADS) lars_update_##SUF(          \
      float* w, const float* g, float* mom, const int64_t* chunk_start, const int* chunk_len,    \
      const int* chunk_tensor, const int* tensor_vector, const float* trust, float wd,           \
      float lr_weights, float lr_biases, float momentum, T* work) {                              \
    barlow::lars_update<T>(w, g, mom, chunk_start, chunk_len, chunk_tensor, tensor_vector,       \
                           trust, wd, lr_weights, lr_biases, momentum, work);                    \
  }
BARLOW_LARS_UPDATE(f32, float)
BARLOW_LARS_UPDATE(bf16, __nv_bfloat16)
