// The loss through the batch Gram matrices Ga = ẐaẐaᵀ, Gb = ẐbẐbᵀ (N×N) instead of C (D×D):
//   Σᵢⱼ Cᵢⱼ² = ⟨Ga, Gb⟩ / N²,  Cᵢᵢ = (1/N) Σₙ Ẑa[n,i]·Ẑb[n,i],
//   off = λ(Σᵢⱼ Cᵢⱼ² − Σᵢ Cᵢᵢ²),  on = Σᵢ (1 − Cᵢᵢ)²,
//   dẐa = (2λ/N²)·Gb·Ẑa + kᵢ·Ẑb,  kᵢ = (2(Cᵢᵢ − 1) − 2λCᵢᵢ)/N   (and symmetrically for Ẑb).
// The GEMMs run in cuBLAS; these kernels do the rest. Sums are f64 in a fixed order, since the
// off-diagonal term is a difference of two sums near D when C ≈ I.
#include "common.cuh"

namespace barlow {

// Partial dot products Σₙ a[n,i]·b[n,i] over the rows of chunk blockIdx.y (rows_per_chunk rows
// each), into part[chunk·D + i]: the grid spans columns and row chunks, so a short D still fills
// the GPU. gram_final adds the chunks in order and divides by N.
template <typename T>
__device__ void gram_diag(const T* __restrict__ a, const T* __restrict__ b,
                          double* __restrict__ part, int64_t n, int64_t d,
                          int64_t rows_per_chunk) {
  __shared__ double s[ROWS][COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t)blockIdx.x * COLS + tx;
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = min(n, r0 + rows_per_chunk);
  double acc = 0.0;
  if (col < d) {
    for (int64_t r = r0 + ty; r < r1; r += ROWS) {
      acc += (double)to_f32(a[r * d + col]) * (double)to_f32(b[r * d + col]);
    }
  }
  s[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < d) {
    for (int k = 1; k < ROWS; ++k) acc += s[k][tx];
    part[(int64_t)blockIdx.y * d + col] = acc;
  }
}

template <typename T>
__device__ void gram_grad_init(const T* __restrict__ other, const float* __restrict__ coef,
                               float* __restrict__ out, int64_t n, int64_t d) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n * d) out[i] = to_f32(other[i]) * coef[i % d];
}

constexpr int GRAM_THREADS = 256;

}  // namespace barlow

extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)
    gram_diag_f32(const float* a, const float* b, double* part, int64_t n, int64_t d,
                  int64_t rows_per_chunk) {
  barlow::gram_diag<float>(a, b, part, n, d, rows_per_chunk);
}

extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)
    gram_diag_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, double* part, int64_t n,
                   int64_t d, int64_t rows_per_chunk) {
  barlow::gram_diag<__nv_bfloat16>(a, b, part, n, d, rows_per_chunk);
}

// Per-block partial sums of ga ⊙ gb (len = N²), in f64; the grid depends only on len. With
// `tf32` set, Ga and Gb are rounded to TF32 in place after being read, for the TF32 gradient
// GEMMs that read them next (each element belongs to one thread: no race).
extern "C" __global__ void __launch_bounds__(barlow::GRAM_THREADS)
    gram_dot_partial(float* ga, float* gb, double* partials, int64_t len, int tf32) {
  __shared__ double scratch[barlow::GRAM_THREADS];
  double acc = 0.0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float a = ga[i], b = gb[i];
    acc += (double)a * (double)b;
    if (tf32) {
      ga[i] = barlow::round_tf32(a);
      gb[i] = barlow::round_tf32(b);
    }
  }
  acc = barlow::block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block: out = [on, λ·off, total]; coef[i] = kᵢ for the gradients. Cᵢᵢ is the sum of
// gram_diag's `chunks` partial dots (in chunk order) over N.
extern "C" __global__ void __launch_bounds__(barlow::GRAM_THREADS)
    gram_final(const double* partials, int64_t blocks, const double* cii, int64_t chunks,
               int64_t n, int64_t d, double lambda, double* out, float* coef) {
  __shared__ double scratch[barlow::GRAM_THREADS];
  double dot = 0.0, on = 0.0, diag_sq = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) dot += partials[b];
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += cii[k * d + i];
    const double c = sum / (double)n;
    on += (1.0 - c) * (1.0 - c);
    diag_sq += c * c;
    coef[i] = (float)((2.0 * (c - 1.0) - 2.0 * lambda * c) / (double)n);
  }
  dot = barlow::block_sum(dot, scratch);
  on = barlow::block_sum(on, scratch);
  diag_sq = barlow::block_sum(diag_sq, scratch);
  if (threadIdx.x == 0) {
    // With one column there is no off-diagonal term; otherwise a rounding residue below zero is
    // clamped, since the true value is >= 0.
    double off = d > 1 ? dot / ((double)n * (double)n) - diag_sq : 0.0;
    if (off < 0.0) off = 0.0;
    out[0] = on;
    out[1] = lambda * off;
    out[2] = on + lambda * off;
  }
}

extern "C" __global__ void gram_grad_init_f32(const float* other, const float* coef, float* out,
                                              int64_t n, int64_t d) {
  barlow::gram_grad_init<float>(other, coef, out, n, d);
}

extern "C" __global__ void gram_grad_init_bf16(const __nv_bfloat16* other, const float* coef,
                                               float* out, int64_t n, int64_t d) {
  barlow::gram_grad_init<__nv_bfloat16>(other, coef, out, n, d);
}

// f32 → bf16, for the Gram path's bf16 copies (the naive baseline uses it too).
extern "C" __global__ void naive_cast_bf16(const float* x, __nv_bfloat16* y, int64_t len) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < len) y[i] = __float2bfloat16_rn(x[i]);
}
