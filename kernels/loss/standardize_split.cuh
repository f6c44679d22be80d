// Column reductions in f64 shared by the split-batch standardization (standardize_split.cu) and
// the synchronized batch norm (train/batchnorm.cu): Σ x and Σ (x − mean)² per column of an M×C
// row-major matrix, one block per COLS columns, ROWS row groups merged in a fixed order.
#pragma once
#include "common.cuh"

namespace barlow {

// Sums `v` (this thread's share of column tx) over the ROWS row groups; valid in row group 0.
__device__ __forceinline__ double column_total(double v, double (*s)[COLS]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  s[ty][tx] = v;
  __syncthreads();
  double t = 0.0;
  if (ty == 0)
    for (int g = 0; g < ROWS; ++g) t += s[g][tx];
  __syncthreads();
  return t;
}

template <typename T>
__device__ void column_sums(const T* __restrict__ z, double* __restrict__ out, int64_t n,
                            int64_t d) {
  __shared__ double s[ROWS][COLS];
  const int64_t col = (int64_t)blockIdx.x * COLS + threadIdx.x;
  double acc = 0.0;
  if (col < d)
    for (int64_t r = threadIdx.y; r < n; r += ROWS) acc += (double)to_f32(z[r * d + col]);
  const double t = column_total(acc, s);
  if (threadIdx.y == 0 && col < d) out[col] = t;
}

template <typename T>
__device__ void centered_squares(const T* __restrict__ z, const double* __restrict__ sums,
                                 double inv_count, double* __restrict__ out, int64_t n,
                                 int64_t d) {
  __shared__ double s[ROWS][COLS];
  const int64_t col = (int64_t)blockIdx.x * COLS + threadIdx.x;
  double acc = 0.0;
  if (col < d) {
    const double mean = sums[col] * inv_count;
    for (int64_t r = threadIdx.y; r < n; r += ROWS) {
      const double t = (double)to_f32(z[r * d + col]) - mean;
      acc += t * t;
    }
  }
  const double t = column_total(acc, s);
  if (threadIdx.y == 0 && col < d) out[col] = t;
}

}  // namespace barlow
