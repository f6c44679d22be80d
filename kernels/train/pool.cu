// Pooling over NHWC activations: the ImageNet stem's 3×3 stride-2 padding-1 max-pool and the
// global average pool before the projector.
//
// The max-pool stores, per output, which of its nine window positions won (the first maximum in
// row-major window order, as the CPU layer). Its backward gathers instead of scattering: each
// input sums the gradients of the (at most four) windows it won, in a fixed order, so no atomics
// and bit-identical results.
#include "common.cuh"

namespace barlow {

constexpr int POOL_K = 3, POOL_S = 2, POOL_P = 1;

template <typename T>
__device__ void maxpool_fwd(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ arg,
                            int64_t n, int64_t h, int64_t w, int64_t c, int64_t ho, int64_t wo) {
  // Rows are output positions (b, oy, ox); the host keeps their count below 2³¹, so finding a
  // row's position takes 32-bit divisions, once per row.
  BARLOW_FOR_ROWS(n * ho * wo, r) {
    const uint32_t ur = (uint32_t)r;
    const int64_t ox = ur % (uint32_t)wo;
    const int64_t oy = (ur / (uint32_t)wo) % (uint32_t)ho;
    const int64_t b = ur / (uint32_t)(wo * ho);
    BARLOW_FOR_CHANNELS(c, ch) {
      float best = 0.f;
      int won = -1;
      for (int ky = 0; ky < POOL_K; ++ky) {
        const int64_t iy = oy * POOL_S + ky - POOL_P;
        if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < POOL_K; ++kx) {
          const int64_t ix = ox * POOL_S + kx - POOL_P;
          if (ix < 0 || ix >= w) continue;
          const float v = to_f32(x[((b * h + iy) * w + ix) * c + ch]);
          if (won < 0 || v > best) {
            best = v;
            won = ky * POOL_K + kx;
          }
        }
      }
      const int64_t i = r * c + ch;
      y[i] = from_f32<T>(best);
      arg[i] = (uint8_t)won;
    }
  }
}

template <typename T>
__device__ void maxpool_bwd(const T* __restrict__ dy, const uint8_t* __restrict__ arg,
                            T* __restrict__ dx, int64_t n, int64_t h, int64_t w, int64_t c,
                            int64_t ho, int64_t wo) {
  BARLOW_FOR_ROWS(n * h * w, r) {
    const uint32_t ur = (uint32_t)r;
    const int64_t ix = ur % (uint32_t)w;
    const int64_t iy = (ur / (uint32_t)w) % (uint32_t)h;
    const int64_t b = ur / (uint32_t)(w * h);
    BARLOW_FOR_CHANNELS(c, ch) {
      float g = 0.f;
      // Outputs whose window holds (iy, ix): oy·S + ky − P = iy for some ky in [0, K).
      for (int ky = 0; ky < POOL_K; ++ky) {
        const int64_t t = iy + POOL_P - ky;
        if (t < 0 || t % POOL_S) continue;
        const int64_t oy = t / POOL_S;
        if (oy >= ho) continue;
        for (int kx = 0; kx < POOL_K; ++kx) {
          const int64_t u = ix + POOL_P - kx;
          if (u < 0 || u % POOL_S) continue;
          const int64_t ox = u / POOL_S;
          if (ox >= wo) continue;
          const int64_t o = ((b * ho + oy) * wo + ox) * c + ch;
          if (arg[o] == ky * POOL_K + kx) g += to_f32(dy[o]);
        }
      }
      dx[r * c + ch] = from_f32<T>(g);
    }
  }
}

// y[b, ch] = mean over the hw positions of x[b, ·, ch].
template <typename T>
__device__ void avgpool_fwd(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t hw,
                            int64_t c) {
  const int64_t total = n * c;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ch = i % c, b = i / c;
    float s = 0.f;
    for (int64_t p = 0; p < hw; ++p) s += to_f32(x[(b * hw + p) * c + ch]);
    y[i] = from_f32<T>(s / (float)hw);
  }
}

template <typename T>
__device__ void avgpool_bwd(const T* __restrict__ dy, T* __restrict__ dx, int64_t n, int64_t hw,
                            int64_t c) {
  BARLOW_FOR_ROWS(n * hw, r) {
    const int64_t b = (uint32_t)r / (uint32_t)hw;
    BARLOW_FOR_CHANNELS(c, ch) { dx[r * c + ch] = from_f32<T>(to_f32(dy[b * c + ch]) / (float)hw); }
  }
}

}  // namespace barlow

#define BARLOW_POOL(SUF, T)                                                                    \
  extern "C" __global__ void maxpool_fwd_##SUF(const T* x, T* y, uint8_t* arg, int64_t n,      \
                                               int64_t h, int64_t w, int64_t c, int64_t ho,    \
                                               int64_t wo) {                                   \
    barlow::maxpool_fwd<T>(x, y, arg, n, h, w, c, ho, wo);                                     \
  }                                                                                            \
  extern "C" __global__ void maxpool_bwd_##SUF(const T* dy, const uint8_t* arg, T* dx,         \
                                               int64_t n, int64_t h, int64_t w, int64_t c,     \
                                               int64_t ho, int64_t wo) {                       \
    barlow::maxpool_bwd<T>(dy, arg, dx, n, h, w, c, ho, wo);                                   \
  }                                                                                            \
  extern "C" __global__ void avgpool_fwd_##SUF(const T* x, T* y, int64_t n, int64_t hw,        \
                                               int64_t c) {                                    \
    barlow::avgpool_fwd<T>(x, y, n, hw, c);                                                    \
  }                                                                                            \
  extern "C" __global__ void avgpool_bwd_##SUF(const T* dy, T* dx, int64_t n, int64_t hw,      \
                                               int64_t c) {                                    \
    barlow::avgpool_bwd<T>(dy, dx, n, hw, c);                                                  \
  }
BARLOW_POOL(f32, float)
BARLOW_POOL(bf16, __nv_bfloat16)
