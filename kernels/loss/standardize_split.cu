// The standardization of a batch split across ranks: each rank holds some rows of Z, and the column
// statistics are the whole batch's. The host sums each stage's per-column f64 results over the
// ranks between launches:
//
//   column_sums        Σ z                      (summed over ranks → the mean)
//   centered_squares   Σ (z − mean)²            (summed over ranks → the biased variance)
//   standardize_apply  stats [mean_hi | mean_lo | rstd] and Ẑ = (z − mean)·rstd
//   std_bwd_sums       Σ g, Σ g·x̂               (summed over ranks)
//   std_bwd_apply      dz = rstd·(g − mean(g) − x̂·mean(g·x̂))
//
// The same two passes as the CPU twin (crate::cpu::{column_sums, centered_squares, ...}), with f64
// accumulation per thread and the ROWS row groups merged in a fixed order, so the result does not
// depend on timing. Layout and launch shape as in standardize.cuh: a block owns COLS columns.
#include "loss/standardize.cuh"
#include "loss/standardize_split.cuh"

namespace barlow {

template <typename T, typename O>
__device__ void standardize_apply(const T* __restrict__ z, const double* __restrict__ sums,
                                  const double* __restrict__ sq, double inv_count, float eps,
                                  float* __restrict__ stats, O* __restrict__ zhat, int64_t n,
                                  int64_t d, int tf32) {
  __shared__ float s_hi[COLS], s_lo[COLS], s_rstd[COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t)blockIdx.x * COLS + tx;
  if (ty == 0 && col < d) {
    const double mean = sums[col] * inv_count;
    const float hi = (float)mean;
    const float lo = (float)(mean - (double)hi);
    const float rstd = (float)(1.0 / sqrt(sq[col] * inv_count + (double)eps));
    s_hi[tx] = hi;
    s_lo[tx] = lo;
    s_rstd[tx] = rstd;
    stats[col] = hi;
    stats[d + col] = lo;
    stats[2 * d + col] = rstd;
  }
  __syncthreads();
  if (col >= d) return;
  const float hi = s_hi[tx], lo = s_lo[tx], rs = s_rstd[tx];
  for (int64_t r = ty; r < n; r += ROWS) {
    const int64_t i = r * d + col;
    const float v = ((to_f32(z[i]) - hi) - lo) * rs;
    zhat[i] = from_f32<O>(tf32 ? round_tf32(v) : v);
  }
}

template <typename T>
__device__ void std_bwd_sums(const float* __restrict__ g, const T* __restrict__ z,
                             const float* __restrict__ stats, double* __restrict__ out, int64_t n,
                             int64_t d) {
  __shared__ double s[ROWS][COLS];
  const int64_t col = (int64_t)blockIdx.x * COLS + threadIdx.x;
  double sum = 0.0, dot = 0.0;
  if (col < d) {
    const float hi = stats[col], lo = stats[d + col], rs = stats[2 * d + col];
    for (int64_t r = threadIdx.y; r < n; r += ROWS) {
      const int64_t i = r * d + col;
      const double gi = (double)g[i];
      sum += gi;
      dot += gi * (double)(((to_f32(z[i]) - hi) - lo) * rs);
    }
  }
  const double ts = column_total(sum, s);
  const double td = column_total(dot, s);
  if (threadIdx.y == 0 && col < d) {
    out[col] = ts;
    out[d + col] = td;
  }
}

template <typename T>
__device__ void std_bwd_apply(const float* __restrict__ g, const T* __restrict__ z,
                              const float* __restrict__ stats, const double* __restrict__ sums,
                              double inv_count, T* __restrict__ dz, int64_t n, int64_t d) {
  const int64_t col = (int64_t)blockIdx.x * COLS + threadIdx.x;
  if (col >= d) return;
  const float hi = stats[col], lo = stats[d + col], rs = stats[2 * d + col];
  const double mg = sums[col] * inv_count, mgx = sums[d + col] * inv_count;
  for (int64_t r = threadIdx.y; r < n; r += ROWS) {
    const int64_t i = r * d + col;
    const double xhat = (double)(((to_f32(z[i]) - hi) - lo) * rs);
    dz[i] = from_f32<T>((float)((double)rs * ((double)g[i] - mg - xhat * mgx)));
  }
}

}  // namespace barlow

#define BARLOW_SPLIT_IN(SUFFIX, T)                                                            \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                   \
      column_sums_##SUFFIX(const T* z, double* out, int64_t n, int64_t d) {                   \
    barlow::column_sums<T>(z, out, n, d);                                                     \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                   \
      centered_squares_##SUFFIX(const T* z, const double* sums, double inv_count, double* out, \
                                int64_t n, int64_t d) {                                       \
    barlow::centered_squares<T>(z, sums, inv_count, out, n, d);                               \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                   \
      std_bwd_sums_##SUFFIX(const float* g, const T* z, const float* stats, double* out,      \
                            int64_t n, int64_t d) {                                           \
    barlow::std_bwd_sums<T>(g, z, stats, out, n, d);                                          \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                   \
      std_bwd_apply_##SUFFIX(const float* g, const T* z, const float* stats,                  \
                             const double* sums, double inv_count, T* dz, int64_t n,          \
                             int64_t d) {                                                     \
    barlow::std_bwd_apply<T>(g, z, stats, sums, inv_count, dz, n, d);                         \
  }
BARLOW_SPLIT_IN(f32, float)
BARLOW_SPLIT_IN(bf16, __nv_bfloat16)
BARLOW_SPLIT_IN(f16, __half)

#define BARLOW_SPLIT_APPLY(NAME, IN, OUT)                                                     \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS) NAME(             \
      const IN* z, const double* sums, const double* sq, double inv_count, float eps,         \
      float* stats, OUT* zhat, int64_t n, int64_t d, int tf32) {                              \
    barlow::standardize_apply<IN, OUT>(z, sums, sq, inv_count, eps, stats, zhat, n, d, tf32); \
  }
BARLOW_SPLIT_APPLY(standardize_apply_f32_f32, float, float)
BARLOW_SPLIT_APPLY(standardize_apply_bf16_f32, __nv_bfloat16, float)
BARLOW_SPLIT_APPLY(standardize_apply_f16_f32, __half, float)
BARLOW_SPLIT_APPLY(standardize_apply_f32_bf16, float, __nv_bfloat16)
BARLOW_SPLIT_APPLY(standardize_apply_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
BARLOW_SPLIT_APPLY(standardize_apply_f16_bf16, __half, __nv_bfloat16)
