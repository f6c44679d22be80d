// The baseline: one kernel per tensor operation, as a direct port of the reference PyTorch loss
// executes it (BatchNorm1d statistics, normalize, matmul, diagonal and off-diagonal copies, square,
// sum; autograd's backward as separate elementwise kernels into fresh buffers). Used by benchmarks
// and as a second opinion in tests; not a code path the fused loss takes.
#include "common.cuh"

// Column statistics: one thread per column walks the batch (coalesced across the warp).
extern "C" __global__ void naive_col_mean(const float* z, float* mean, int64_t n, int64_t d) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float s = 0.f;
  for (int64_t r = 0; r < n; ++r) s += z[r * d + c];
  mean[c] = s / (float)n;
}

extern "C" __global__ void naive_col_var(const float* z, const float* mean, float* var, int64_t n,
                                         int64_t d) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const float m = mean[c];
  float s = 0.f;
  for (int64_t r = 0; r < n; ++r) {
    const float t = z[r * d + c] - m;
    s += t * t;
  }
  var[c] = s / (float)n;
}

extern "C" __global__ void naive_normalize(const float* z, const float* mean, const float* var,
                                           float* zhat, int64_t n, int64_t d, float eps) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n * d) return;
  const int64_t c = i % d;
  zhat[i] = (z[i] - mean[c]) / sqrtf(var[c] + eps);
}

extern "C" __global__ void naive_col_sum(const float* x, float* out, int64_t n, int64_t d) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float s = 0.f;
  for (int64_t r = 0; r < n; ++r) s += x[r * d + c];
  out[c] = s;
}

extern "C" __global__ void naive_mul(const float* a, const float* b, float* out, int64_t len) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < len) out[i] = a[i] * b[i];
}

// out = a * x + b, elementwise.
extern "C" __global__ void naive_affine(const float* x, float* out, int64_t len, float a,
                                        float b) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < len) out[i] = a * x[i] + b;
}

extern "C" __global__ void naive_square(const float* x, float* out, int64_t len) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < len) out[i] = x[i] * x[i];
}

extern "C" __global__ void naive_diag_copy(const float* c, float* diag, int64_t d) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < d) diag[i] = c[i * (d + 1)];
}

// off_diagonal(c) = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten(): d*(d-1) elements.
extern "C" __global__ void naive_off_diag_copy(const float* c, float* off, int64_t d) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= d * (d - 1)) return;
  off[k] = c[(k / d) * (d + 1) + 1 + k % d];
}

extern "C" __global__ void naive_off_diag_scatter(const float* off, float* gc, int64_t d) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= d * (d - 1)) return;
  gc[(k / d) * (d + 1) + 1 + k % d] = off[k];
}

extern "C" __global__ void naive_diag_scatter(const float* diag, float* gc, int64_t d) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < d) gc[i * (d + 1)] = diag[i];
}

// Two-stage sum, like a framework's generic reduction: per-block partials, then one block.
extern "C" __global__ void naive_sum_partial(const float* x, float* partials, int64_t len) {
  __shared__ float scratch[256];
  float s = 0.f;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
       i += (int64_t)gridDim.x * blockDim.x)
    s += x[i];
  s = barlow::block_sum(s, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void naive_sum_final(const float* partials, float* out, int64_t blocks) {
  __shared__ float scratch[256];
  float s = 0.f;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) s += partials[b];
  s = barlow::block_sum(s, scratch);
  if (threadIdx.x == 0) out[0] = s;
}

// BatchNorm backward, elementwise part: dz = rstd * (g - s1/n - xhat * s2/n).
extern "C" __global__ void naive_bn_bwd(const float* g, const float* zhat, const float* var,
                                        const float* s1, const float* s2, float* dz, int64_t n,
                                        int64_t d, float eps) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n * d) return;
  const int64_t c = i % d;
  const float rstd = 1.f / sqrtf(var[c] + eps);
  dz[i] = rstd * (g[i] - s1[c] / (float)n - zhat[i] * s2[c] / (float)n);
}
