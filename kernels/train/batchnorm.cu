// Batch normalization over the rows of an M×C row-major matrix: NHWC activations (M = N·H·W) and
// the projector's N×C features alike. Training statistics are biased (what the norm divides by);
// the running variance is unbiased, momentum as PyTorch.
//
// Reductions split the rows into a fixed number of chunks (a function of M and C only): stage 1
// writes one partial per (chunk, channel), stage 2 merges them in chunk order in double precision,
// so results are bit-identical run to run. A block covers COLS adjacent channels (coalesced row
// reads) and ROWS row-groups inside its chunk.
//
// The forward applies the affine, the optional residual add and the optional ReLU in one pass.
// The backward recomputes x̂ from the norm's input, takes the ReLU mask from the stored output,
// and writes the residual branch's gradient in the same pass.
#include "common.cuh"
#include "loss/standardize_split.cuh"

namespace barlow {

__device__ __forceinline__ void chunk_rows(int64_t m, int64_t rows_per_chunk, int64_t* r0,
                                           int64_t* r1) {
  *r0 = (int64_t)blockIdx.y * rows_per_chunk;
  *r1 = min(m, *r0 + rows_per_chunk);
}

// Stage 1 of the statistics: per (chunk, channel) count, mean and M2 of x − x[0, c] (the shift
// keeps Welford exact when |mean| ≫ std). partial = [cnt | mean | m2], each chunks×C.
template <typename T>
__device__ void bn_stats_partial(const T* __restrict__ x, float* __restrict__ partial, int64_t m,
                                 int64_t c, int64_t rows_per_chunk) {
  __shared__ float s_cnt[ROWS][COLS];
  __shared__ float s_mean[ROWS][COLS];
  __shared__ float s_m2[ROWS][COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t)blockIdx.x * COLS + tx;
  const bool live = col < c;
  int64_t r0, r1;
  chunk_rows(m, rows_per_chunk, &r0, &r1);
  const float shift = live ? to_f32(x[col]) : 0.f;
  float cnt = 0.f, mean = 0.f, m2 = 0.f;
  if (live) {
    for (int64_t r = r0 + ty; r < r1; r += ROWS) {
      const float v = to_f32(x[r * c + col]) - shift;
      cnt += 1.f;
      const float delta = v - mean;
      // A correctly rounded reciprocal instead of a division: the division's slow path is a
      // call whose saved registers spill on sm_90.
      mean += delta * __frcp_rn(cnt);
      m2 += delta * (v - mean);
    }
  }
  s_cnt[ty][tx] = cnt;
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();
  if (ty != 0 || !live) return;
  float n = s_cnt[0][tx], mu = s_mean[0][tx], q = s_m2[0][tx];
  for (int g = 1; g < ROWS; ++g) {
    const float nb = s_cnt[g][tx];
    if (nb == 0.f) continue;
    const float tot = n + nb;
    const float delta = s_mean[g][tx] - mu;
    mu += delta * (nb / tot);
    q += s_m2[g][tx] + delta * delta * (n * nb / tot);
    n = tot;
  }
  const int64_t chunks = gridDim.y;
  const int64_t at = (int64_t)blockIdx.y * c + col;
  partial[at] = n;
  partial[chunks * c + at] = mu;
  partial[2 * chunks * c + at] = q;
}

// The final merges give each channel MERGE_LANES threads (MERGE_CHANNELS channels to a block of
// MERGE_THREADS): lane l merges chunks l, l + MERGE_LANES, ... in order, then the lanes are
// merged pairwise in a fixed tree (l with l + 16, then l + 8, ...). The order is the same on every
// run, and each thread walks 1/32 of the chunks instead of all of them.
constexpr int MERGE_LANES = 32;
constexpr int MERGE_THREADS = 256;
constexpr int MERGE_CHANNELS = MERGE_THREADS / MERGE_LANES;

// Chan's merge of the partial (nb, mb, qb) into (n, mu, q): counts, means and M2 of shifted values.
__device__ __forceinline__ void chan_merge(double& n, double& mu, double& q, double nb, double mb,
                                           double qb) {
  if (nb == 0.0) return;
  const double tot = n + nb;
  const double delta = mb - mu;
  mu += delta * (nb / tot);
  q += qb + delta * delta * (n * nb / tot);
  n = tot;
}

template <typename T>
__device__ void bn_stats_final(const T* __restrict__ x, const float* __restrict__ partial,
                               int64_t chunks, int64_t m, int64_t c, float eps, float momentum,
                               int update_running, float* __restrict__ mean_out,
                               float* __restrict__ rstd_out, float* __restrict__ running_mean,
                               float* __restrict__ running_var) {
  __shared__ double s_n[MERGE_THREADS];
  __shared__ double s_mu[MERGE_THREADS];
  __shared__ double s_q[MERGE_THREADS];
  const int t = threadIdx.x, lane = t % MERGE_LANES;
  const int64_t col = (int64_t)blockIdx.x * MERGE_CHANNELS + t / MERGE_LANES;
  double n = 0.0, mu = 0.0, q = 0.0;
  if (col < c) {
    for (int64_t k = lane; k < chunks; k += MERGE_LANES) {
      chan_merge(n, mu, q, partial[k * c + col], partial[chunks * c + k * c + col],
                 partial[2 * chunks * c + k * c + col]);
    }
  }
  s_n[t] = n;
  s_mu[t] = mu;
  s_q[t] = q;
  __syncthreads();
  for (int s = MERGE_LANES / 2; s > 0; s /= 2) {
    if (lane < s) chan_merge(s_n[t], s_mu[t], s_q[t], s_n[t + s], s_mu[t + s], s_q[t + s]);
    __syncthreads();
  }
  if (lane != 0 || col >= c) return;
  q = s_q[t];
  mu = s_mu[t];
  const float var = (float)(q / (double)m);
  const float mean = (float)((double)to_f32(x[col]) + mu);
  mean_out[col] = mean;
  rstd_out[col] = 1.f / sqrtf(var + eps);
  if (update_running) {
    const float unbias = m > 1 ? (float)m / (float)(m - 1) : 1.f;
    running_mean[col] = (1.f - momentum) * running_mean[col] + momentum * mean;
    running_var[col] = (1.f - momentum) * running_var[col] + momentum * var * unbias;
  }
}

// y = act((x − mean)·rstd·γ + β (+ residual)), act = ReLU or identity.
template <typename T>
__device__ void bn_apply(const T* __restrict__ x, const float* __restrict__ mean,
                         const float* __restrict__ rstd, const float* __restrict__ gamma,
                         const float* __restrict__ beta, const T* __restrict__ residual,
                         T* __restrict__ y, int64_t m, int64_t c, int relu) {
  BARLOW_FOR_ROWS(m, r) {
    BARLOW_FOR_CHANNELS(c, ch) {
      const int64_t i = r * c + ch;
      float v = (to_f32(x[i]) - mean[ch]) * rstd[ch] * gamma[ch] + beta[ch];
      if (residual) v += to_f32(residual[i]);
      if (relu) v = fmaxf(v, 0.f);
      y[i] = from_f32<T>(v);
    }
  }
}

// The gradient that reaches the norm: dy, zeroed where the ReLU's output was not positive.
template <typename T>
__device__ __forceinline__ float masked(const T* dy, const T* y, int64_t i) {
  const float g = to_f32(dy[i]);
  return (y && !(to_f32(y[i]) > 0.f)) ? 0.f : g;
}

// Stage 1 of the backward sums: per (chunk, channel) Σg and Σg·x̂. partial = [Σg | Σg·x̂].
template <typename T>
__device__ void bn_bwd_partial(const T* __restrict__ dy, const T* __restrict__ y,
                               const T* __restrict__ x, const float* __restrict__ mean,
                               const float* __restrict__ rstd, float* __restrict__ partial,
                               int64_t m, int64_t c, int64_t rows_per_chunk) {
  __shared__ float s_sum[ROWS][COLS];
  __shared__ float s_dot[ROWS][COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (int64_t)blockIdx.x * COLS + tx;
  const bool live = col < c;
  int64_t r0, r1;
  chunk_rows(m, rows_per_chunk, &r0, &r1);
  float sum = 0.f, dot = 0.f;
  if (live) {
    const float mu = mean[col], rs = rstd[col];
    for (int64_t r = r0 + ty; r < r1; r += ROWS) {
      const int64_t i = r * c + col;
      const float g = masked(dy, y, i);
      sum += g;
      dot += g * ((to_f32(x[i]) - mu) * rs);
    }
  }
  s_sum[ty][tx] = sum;
  s_dot[ty][tx] = dot;
  __syncthreads();
  if (ty != 0 || !live) return;
  for (int g = 1; g < ROWS; ++g) {
    sum += s_sum[g][tx];
    dot += s_dot[g][tx];
  }
  const int64_t chunks = gridDim.y;
  const int64_t at = (int64_t)blockIdx.y * c + col;
  partial[at] = sum;
  partial[chunks * c + at] = dot;
}

// Stage 2: dβ += Σg, dγ += Σg·x̂ (the parameter gradients accumulate over views), and the two
// per-channel means the input gradient needs, into coef = [Σg/M | Σg·x̂/M].
__device__ void bn_bwd_final(const float* __restrict__ partial, int64_t chunks, int64_t m,
                             int64_t c, float* __restrict__ dgamma, float* __restrict__ dbeta,
                             float* __restrict__ coef) {
  __shared__ double s_sum[MERGE_THREADS];
  __shared__ double s_dot[MERGE_THREADS];
  const int t = threadIdx.x, lane = t % MERGE_LANES;
  const int64_t col = (int64_t)blockIdx.x * MERGE_CHANNELS + t / MERGE_LANES;
  double sum = 0.0, dot = 0.0;
  if (col < c) {
    for (int64_t k = lane; k < chunks; k += MERGE_LANES) {
      sum += partial[k * c + col];
      dot += partial[chunks * c + k * c + col];
    }
  }
  s_sum[t] = sum;
  s_dot[t] = dot;
  __syncthreads();
  for (int s = MERGE_LANES / 2; s > 0; s /= 2) {
    if (lane < s) {
      s_sum[t] += s_sum[t + s];
      s_dot[t] += s_dot[t + s];
    }
    __syncthreads();
  }
  if (lane != 0 || col >= c) return;
  sum = s_sum[t];
  dot = s_dot[t];
  dbeta[col] += (float)sum;
  dgamma[col] += (float)dot;
  coef[col] = (float)(sum / (double)m);
  coef[c + col] = (float)(dot / (double)m);
}

// dx = γ·rstd·(g − mean(g) − x̂·mean(g·x̂)); the residual branch gets g itself (written, or added
// when another path already wrote that gradient).
template <typename T>
__device__ void bn_bwd_apply(const T* __restrict__ dy, const T* __restrict__ y,
                             const T* __restrict__ x, const float* __restrict__ mean,
                             const float* __restrict__ rstd, const float* __restrict__ gamma,
                             const float* __restrict__ coef, T* __restrict__ dx,
                             T* __restrict__ dres, int accum_res, int64_t m, int64_t c) {
  BARLOW_FOR_ROWS(m, r) {
    BARLOW_FOR_CHANNELS(c, ch) {
      const int64_t i = r * c + ch;
      const float g = masked(dy, y, i);
      const float rs = rstd[ch];
      const float xhat = (to_f32(x[i]) - mean[ch]) * rs;
      dx[i] = from_f32<T>(gamma[ch] * rs * (g - coef[ch] - xhat * coef[c + ch]));
      if (dres) dres[i] = from_f32<T>(accum_res ? to_f32(dres[i]) + g : g);
    }
  }
}

// Synchronized batch norm (a batch split across ranks): the statistics come from sums over every
// rank's rows, added up by the host's collectives between launches (column_sums and
// centered_squares of standardize_split.cuh forward; bn_bwd_sums backward).

// Σg and Σg·x̂ per channel of this rank's rows, in f64: out = [Σg | Σg·x̂].
template <typename T>
__device__ void bn_bwd_sums(const T* __restrict__ dy, const T* __restrict__ y,
                            const T* __restrict__ x, const float* __restrict__ mean,
                            const float* __restrict__ rstd, double* __restrict__ out, int64_t m,
                            int64_t c) {
  __shared__ double s[ROWS][COLS];
  const int64_t col = (int64_t)blockIdx.x * COLS + threadIdx.x;
  double sum = 0.0, dot = 0.0;
  if (col < c) {
    const float mu = mean[col], rs = rstd[col];
    for (int64_t r = threadIdx.y; r < m; r += ROWS) {
      const int64_t i = r * c + col;
      const float g = masked(dy, y, i);
      sum += (double)g;
      dot += (double)(g * ((to_f32(x[i]) - mu) * rs));
    }
  }
  const double ts = column_total(sum, s);
  const double td = column_total(dot, s);
  if (threadIdx.y == 0 && col < c) {
    out[col] = ts;
    out[c + col] = td;
  }
}

}  // namespace barlow

// Mean, rstd and the running statistics from the whole batch's sums (m rows in all).
extern "C" __global__ void bn_sync_stats(const double* sums, const double* sq, int64_t m, int64_t c,
                                         float eps, float momentum, float* mean, float* rstd,
                                         float* running_mean, float* running_var) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= c) return;
  const double mu = sums[col] / (double)m;
  const float var = (float)(sq[col] / (double)m);
  mean[col] = (float)mu;
  rstd[col] = 1.f / sqrtf(var + eps);
  const float unbias = m > 1 ? (float)m / (float)(m - 1) : 1.f;
  running_mean[col] = (1.f - momentum) * running_mean[col] + momentum * (float)mu;
  running_var[col] = (1.f - momentum) * running_var[col] + momentum * var * unbias;
}

// dβ += Σg, dγ += Σg·x̂ of this rank's rows (the gradients are summed over the ranks later).
extern "C" __global__ void bn_sync_params(const double* sums, int64_t c, float* dgamma,
                                          float* dbeta) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= c) return;
  dbeta[col] += (float)sums[col];
  dgamma[col] += (float)sums[c + col];
}

// The input gradient's coefficients from the whole batch's sums: coef = [Σg/m | Σg·x̂/m].
extern "C" __global__ void bn_sync_coef(const double* sums, int64_t m, int64_t c, float* coef) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= c) return;
  coef[col] = (float)(sums[col] / (double)m);
  coef[c + col] = (float)(sums[c + col] / (double)m);
}

// Evaluation mode: mean and rstd from the running statistics.
extern "C" __global__ void bn_eval_stats(const float* running_mean, const float* running_var,
                                         int64_t c, float eps, float* mean, float* rstd) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= c) return;
  mean[col] = running_mean[col];
  rstd[col] = 1.f / sqrtf(running_var[col] + eps);
}

extern "C" __global__ void __launch_bounds__(barlow::MERGE_THREADS)
    bn_bwd_final(const float* partial, int64_t chunks, int64_t m, int64_t c, float* dgamma,
                 float* dbeta, float* coef) {
  barlow::bn_bwd_final(partial, chunks, m, c, dgamma, dbeta, coef);
}

#define BARLOW_BN_SYNC(SUF, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                    \
      bn_sync_sums_##SUF(const T* x, double* out, int64_t m, int64_t c) {                      \
    barlow::column_sums<T>(x, out, m, c);                                                      \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                    \
      bn_sync_centered_##SUF(const T* x, const double* sums, double inv_count, double* out,    \
                             int64_t m, int64_t c) {                                           \
    barlow::centered_squares<T>(x, sums, inv_count, out, m, c);                                \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                    \
      bn_bwd_sums_##SUF(const T* dy, const T* y, const T* x, const float* mean,                \
                        const float* rstd, double* out, int64_t m, int64_t c) {                \
    barlow::bn_bwd_sums<T>(dy, y, x, mean, rstd, out, m, c);                                   \
  }
BARLOW_BN_SYNC(f32, float)
BARLOW_BN_SYNC(bf16, __nv_bfloat16)

#define BARLOW_BN(SUF, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                    \
      bn_stats_partial_##SUF(const T* x, float* partial, int64_t m, int64_t c, int64_t rpc) {   \
    barlow::bn_stats_partial<T>(x, partial, m, c, rpc);                                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(barlow::MERGE_THREADS) bn_stats_final_##SUF(  \
      const T* x, const float* partial, int64_t chunks, int64_t m, int64_t c, float eps,       \
      float momentum, int update_running, float* mean, float* rstd, float* running_mean,       \
      float* running_var) {                                                                    \
    barlow::bn_stats_final<T>(x, partial, chunks, m, c, eps, momentum, update_running, mean,   \
                              rstd, running_mean, running_var);                                \
  }                                                                                            \
  extern "C" __global__ void bn_apply_##SUF(const T* x, const float* mean, const float* rstd,  \
                                            const float* gamma, const float* beta,             \
                                            const T* residual, T* y, int64_t m, int64_t c,     \
                                            int relu) {                                        \
    barlow::bn_apply<T>(x, mean, rstd, gamma, beta, residual, y, m, c, relu);                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(barlow::COLS * barlow::ROWS)                    \
      bn_bwd_partial_##SUF(const T* dy, const T* y, const T* x, const float* mean,             \
                           const float* rstd, float* partial, int64_t m, int64_t c,            \
                           int64_t rpc) {                                                      \
    barlow::bn_bwd_partial<T>(dy, y, x, mean, rstd, partial, m, c, rpc);                       \
  }                                                                                            \
  extern "C" __global__ void bn_bwd_apply_##SUF(                                               \
      const T* dy, const T* y, const T* x, const float* mean, const float* rstd,               \
      const float* gamma, const float* coef, T* dx, T* dres, int accum_res, int64_t m,         \
      int64_t c) {                                                                             \
    barlow::bn_bwd_apply<T>(dy, y, x, mean, rstd, gamma, coef, dx, dres, accum_res, m, c);     \
  }
BARLOW_BN(f32, float)
BARLOW_BN(bf16, __nv_bfloat16)
