// Fused batch standardization (BatchNorm1d without affine, training mode) and its backward pass,
// with the affine (and ReLU) variant the trainer's projector uses: the device code both share.
// With `tf32` set, Ẑ is written rounded to TF32 for the TF32 GEMMs that read it.
//
// Z is N×D row-major. A block owns COLS adjacent columns; its ROWS row-groups each run Welford over
// a strided subset of the rows, then the groups are merged with Chan's formula in a fixed order.
//
// Accuracy when |mean| >> std: Welford runs on values shifted by the column's first element, and
// the mean is kept as an unevaluated f32 pair (hi + lo), so x − mean = (x − hi) − lo stays exact
// where a rounded f32 mean would lose log2(|mean|/std) bits. `stats` holds 3·D floats per view:
// [mean_hi | mean_lo | rstd]; the backward pass reads the same layout.
#pragma once
#include "common.cuh"

namespace barlow {

// The projector's batch norm is this same standardization with an affine and an optional ReLU:
// `gamma`/`beta` non-null turn y = act(x̂·γ + β) on, and `running_mean` non-null moves the running
// statistics (unbiased variance, `momentum`) as BatchNorm1d does in training.
struct Affine {
  const float* gamma;
  const float* beta;
  int relu;
  float momentum;
  float* running_mean;
  float* running_var;
};

template <typename In, typename Out>
__device__ void standardize_fwd(const In* __restrict__ z, Out* __restrict__ zhat,
                                float* __restrict__ stats, int64_t n, int64_t d, float eps,
                                int tf32, Affine aff = Affine{nullptr, nullptr, 0, 0.f, nullptr,
                                                              nullptr}) {
  __shared__ float s_cnt[ROWS][COLS];
  __shared__ float s_mean[ROWS][COLS];
  __shared__ float s_m2[ROWS][COLS];
  __shared__ float s_hi[COLS];
  __shared__ float s_lo[COLS];
  __shared__ float s_rstd[COLS];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t)blockIdx.x * COLS + tx;
  const bool live = col < d;

  const float shift = live ? to_f32(z[col]) : 0.f;
  float cnt = 0.f, mean = 0.f, m2 = 0.f;
  if (live) {
    for (int64_t r = ty; r < n; r += ROWS) {
      const float x = to_f32(z[r * d + col]) - shift;
      cnt += 1.f;
      const float delta = x - mean;
      mean += delta / cnt;
      m2 += delta * (x - mean);
    }
  }
  s_cnt[ty][tx] = cnt;
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();

  if (ty == 0) {
    float c = s_cnt[0][tx], m = s_mean[0][tx], q = s_m2[0][tx];
    for (int g = 1; g < ROWS; ++g) {
      const float cb = s_cnt[g][tx];
      if (cb == 0.f) continue;
      const float mb = s_mean[g][tx];
      const float tot = c + cb;
      const float delta = mb - m;
      m += delta * (cb / tot);
      q += s_m2[g][tx] + delta * delta * (c * cb / tot);
      c = tot;
    }
    const float var = c > 0.f ? q / c : 0.f;  // biased, as BatchNorm normalizes
    const float rstd = 1.f / sqrtf(var + eps);
    // TwoSum: hi + lo == shift + m exactly.
    const float hi = shift + m;
    const float bv = hi - shift;
    const float lo = (shift - (hi - bv)) + (m - bv);
    s_hi[tx] = hi;
    s_lo[tx] = lo;
    s_rstd[tx] = rstd;
    if (live) {
      stats[col] = hi;
      stats[d + col] = lo;
      stats[2 * d + col] = rstd;
      if (aff.running_mean) {
        const float unbias = c > 1.f ? c / (c - 1.f) : 1.f;
        const float mo = aff.momentum;
        aff.running_mean[col] = (1.f - mo) * aff.running_mean[col] + mo * (hi + lo);
        aff.running_var[col] = (1.f - mo) * aff.running_var[col] + mo * var * unbias;
      }
    }
  }
  __syncthreads();

  if (!live) return;
  const float hi = s_hi[tx], lo = s_lo[tx], rs = s_rstd[tx];
  const float g = aff.gamma ? aff.gamma[col] : 1.f;
  const float b = aff.gamma ? aff.beta[col] : 0.f;
  for (int64_t r = ty; r < n; r += ROWS) {
    const int64_t i = r * d + col;
    float v = ((to_f32(z[i]) - hi) - lo) * rs;
    if (aff.gamma) {
      v = v * g + b;
      if (aff.relu) v = fmaxf(v, 0.f);
    }
    zhat[i] = from_f32<Out>(tf32 ? round_tf32(v) : v);
  }
}

// Backward, in one launch: g = dy (zeroed where the ReLU's output y was not positive, when y is
// given), dz = γ·rstd·(g − mean(g) − x̂·mean(g·x̂)) with γ = 1 when absent, and with the affine
// dβ += Σg, dγ += Σg·x̂. x̂ is recomputed from z, so the backward keeps full precision even when
// the forward stored Ẑ in bf16.
template <typename G, typename T>
__device__ void standardize_bwd(const G* __restrict__ dy, const T* __restrict__ y,
                                const T* __restrict__ z, const float* __restrict__ stats,
                                const float* __restrict__ gamma, T* __restrict__ dz,
                                float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t n,
                                int64_t d) {
  __shared__ float s_sum[ROWS][COLS];
  __shared__ float s_dot[ROWS][COLS];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t)blockIdx.x * COLS + tx;
  const bool live = col < d;
  const float hi = live ? stats[col] : 0.f;
  const float lo = live ? stats[d + col] : 0.f;
  const float rs = live ? stats[2 * d + col] : 0.f;

  float sum = 0.f, dot = 0.f;
  if (live) {
    for (int64_t r = ty; r < n; r += ROWS) {
      const int64_t i = r * d + col;
      const float gi = (y && !(to_f32(y[i]) > 0.f)) ? 0.f : to_f32(dy[i]);
      sum += gi;
      dot += gi * (((to_f32(z[i]) - hi) - lo) * rs);
    }
  }
  s_sum[ty][tx] = sum;
  s_dot[ty][tx] = dot;
  __syncthreads();
  if (ty == 0) {
    for (int k = 1; k < ROWS; ++k) {
      sum += s_sum[k][tx];
      dot += s_dot[k][tx];
    }
    s_sum[0][tx] = sum;
    s_dot[0][tx] = dot;
    if (live && dgamma) {
      dbeta[col] += sum;
      dgamma[col] += dot;
    }
  }
  __syncthreads();

  if (!live) return;
  const float inv_n = 1.f / (float)n;
  const float mg = s_sum[0][tx] * inv_n, mgx = s_dot[0][tx] * inv_n;
  const float k = (gamma ? gamma[col] : 1.f) * rs;
  for (int64_t r = ty; r < n; r += ROWS) {
    const int64_t i = r * d + col;
    const float gi = (y && !(to_f32(y[i]) > 0.f)) ? 0.f : to_f32(dy[i]);
    const float xhat = ((to_f32(z[i]) - hi) - lo) * rs;
    dz[i] = from_f32<T>(k * (gi - mg - xhat * mgx));
  }
}

}  // namespace barlow
