// Fused reduction over the cross-correlation matrix C (D×D, row-major, f32).
//
// One read of C yields both loss terms and, optionally, writes dL/dC:
//   diagonal:      (1 - c)^2   and  dL/dc = 2 (c - 1)
//   off-diagonal:  c^2         and  dL/dc = 2 λ c       (λ applied to the sum on the host side too)
// With `tf32` set, dL/dC is written rounded to TF32 for the TF32 GEMMs that read it.
// Stage 1 writes one (on, off) pair of partial sums per block; stage 2 adds them in f64 in a fixed
// order. The grid depends only on D, so results are bit-identical run to run (no float atomics).
#include "common.cuh"

namespace barlow {

constexpr int REDUCE_THREADS = 256;

__device__ __forceinline__ void reduce_one(float c, bool diag, float two_lambda, float& on,
                                           float& off, float& grad) {
  if (diag) {
    const float t = 1.f - c;
    on += t * t;
    grad = -2.f * t;
  } else {
    off += c * c;
    grad = two_lambda * c;
  }
}

// `G` is the gradient element type. For f32 the gradient may alias `c` (in place): each element is
// read once and written once by the same thread, so no __restrict__ on those two pointers.
template <typename G>
__device__ void loss_reduce_partial(const float* c, G* grad, float* __restrict__ partials,
                                    int64_t d, float lambda, int vec, int tf32) {
  __shared__ float scratch[REDUCE_THREADS];
  const float two_lambda = 2.f * lambda;
  const int64_t total = d * d;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  float on = 0.f, off = 0.f;

  if (vec) {
    // The host sets vec when d % 4 == 0 and the pointers are 16-byte aligned: a float4 never
    // crosses a row, so one division finds its row.
    const int64_t total4 = total / 4;
    const float4* c4 = reinterpret_cast<const float4*>(c);
    for (int64_t v = tid; v < total4; v += stride) {
      const int64_t flat = v * 4;
      const int64_t row = flat / d;
      const int64_t col = flat - row * d;
      const float4 x = c4[v];
      float g0, g1, g2, g3;
      reduce_one(x.x, col + 0 == row, two_lambda, on, off, g0);
      reduce_one(x.y, col + 1 == row, two_lambda, on, off, g1);
      reduce_one(x.z, col + 2 == row, two_lambda, on, off, g2);
      reduce_one(x.w, col + 3 == row, two_lambda, on, off, g3);
      if (grad != nullptr) {
        if (tf32) {
          g0 = round_tf32(g0);
          g1 = round_tf32(g1);
          g2 = round_tf32(g2);
          g3 = round_tf32(g3);
        }
        if constexpr (sizeof(G) == 4) {
          reinterpret_cast<float4*>(grad)[v] = make_float4(g0, g1, g2, g3);
        } else {
          grad[flat + 0] = from_f32<G>(g0);
          grad[flat + 1] = from_f32<G>(g1);
          grad[flat + 2] = from_f32<G>(g2);
          grad[flat + 3] = from_f32<G>(g3);
        }
      }
    }
  } else {
    for (int64_t i = tid; i < total; i += stride) {
      const int64_t row = i / d;
      float g;
      reduce_one(c[i], i - row * d == row, two_lambda, on, off, g);
      if (grad != nullptr) grad[i] = from_f32<G>(tf32 ? round_tf32(g) : g);
    }
  }

  on = block_sum(on, scratch);
  off = block_sum(off, scratch);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x + 0] = on;
    partials[2 * blockIdx.x + 1] = off;
  }
}

}  // namespace barlow

// dL/dC, when wanted, overwrites C in place (the f32 backward GEMMs read it from there).
extern "C" __global__ void __launch_bounds__(barlow::REDUCE_THREADS)
    loss_reduce_partial_f32(float* c, int write_grad, float* partials, int64_t d, float lambda,
                            int vec, int tf32) {
  barlow::loss_reduce_partial<float>(c, write_grad ? c : nullptr, partials, d, lambda, vec, tf32);
}

extern "C" __global__ void __launch_bounds__(barlow::REDUCE_THREADS)
    loss_reduce_partial_bf16(const float* c, __nv_bfloat16* grad, float* partials, int64_t d,
                             float lambda, int vec) {
  barlow::loss_reduce_partial<__nv_bfloat16>(c, grad, partials, d, lambda, vec, 0);
}

// out[0] = Σ (1 - c_ii)^2, out[1] = λ Σ_{i≠j} c_ij^2, out[2] = out[0] + out[1]; one block.
extern "C" __global__ void __launch_bounds__(barlow::REDUCE_THREADS)
    loss_reduce_final(const float* partials, int64_t blocks, double lambda, double* out) {
  __shared__ double scratch[barlow::REDUCE_THREADS];
  double on = 0.0, off = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    on += (double)partials[2 * b + 0];
    off += (double)partials[2 * b + 1];
  }
  on = barlow::block_sum(on, scratch);
  off = barlow::block_sum(off, scratch);
  if (threadIdx.x == 0) {
    out[0] = on;
    out[1] = lambda * off;
    out[2] = on + lambda * off;
  }
}

// Copies the loss of the last reduction into caller-owned device memory, so nothing waits on the
// host: dst[0] = total, dst[1] = on-diagonal term, dst[2] = off-diagonal term, dst[3] = 1 when
// the total is not finite (NaN or infinity in the inputs), else 0. Writes the first `slots`
// (1 to 4) of them. One thread.
extern "C" __global__ void loss_publish(const double* out, float* dst, int64_t slots) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const double total = out[2];
  const float v[4] = {(float)total, (float)out[0], (float)out[1],
                      isfinite(total) ? 0.0f : 1.0f};
  for (int64_t i = 0; i < slots && i < 4; ++i) dst[i] = v[i];
}
