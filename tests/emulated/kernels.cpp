// The project's CUDA kernels, run on the CPU through cuda_host.h, against plain double-precision
// references: batch norm (train, eval, backward, with residual and ReLU), the standardization
// kernels (the loss's, their affine variant, and the split-batch stages), the loss reduction, the Gram-path kernels,
// pooling, LARS, the conversions and the naive baseline's kernels. Launch shapes follow the Rust side's; outputs are poisoned
// (NaN) first; inputs are random with odd shapes. Prints one line per check; exits 1 on a failure.
//
// With BARLOW_EMU_REDUCED defined, every kernel still runs, on fewer and smaller shapes (see
// main): the sanitizer runs (scripts/sanitize-emulated.sh) pay for each emulated thread, and the
// thread count, not the data, sets their time.
#include "loss/standardize.cu"
#include "loss/standardize_split.cu"
#include "loss/loss_reduce.cu"
#include "loss/gram.cu"
#include "train/projector_norm.cu"
#include "train/batchnorm.cu"
#include "train/pool.cu"
#include "train/lars.cu"
#include "train/convert.cu"
#include "bench/naive.cu"

#include <stdio.h>

#include <functional>
#include <string>

static int failures = 0;
static int checks = 0;

struct Rng {
  uint64_t s;
  uint64_t next() {
    s += 0x9E3779B97F4A7C15ull;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  double normal() {
    double u = uniform(), v = uniform();
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
  }
};

static std::vector<float> randn(Rng& r, size_t n, float scale = 1.f, float offset = 0.f) {
  std::vector<float> v(n);
  for (auto& x : v) x = float(r.normal()) * scale + offset;
  return v;
}

template <typename T>
T to(float v);
template <>
float to<float>(float v) {
  return v;
}
template <>
__nv_bfloat16 to<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
static float from(float v) { return v; }
static float from(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
std::vector<T> conv(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = to<T>(v[i]);
  return o;
}
template <typename T>
std::vector<float> back(const std::vector<T>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = from(v[i]);
  return o;
}
// Values as the element type holds them: what the reference must start from.
template <typename T>
std::vector<float> rounded(const std::vector<float>& v) {
  return back(conv<T>(v));
}
template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, to<T>(NAN));
}

// Normwise relative error max|a − r| / max|r|; non-finite output counts as infinite.
static double err(const std::vector<float>& a, const std::vector<double>& r) {
  double d = 0, s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    d = std::max(d, std::fabs(double(a[i]) - r[i]));
    s = std::max(s, std::fabs(r[i]));
  }
  return d / std::max(s, 1e-300);
}

// Like err, relative to at least `scale`: an input gradient that cancels to nearly nothing (two
// rows standardize to ±1 exactly, and dx is then zero) is held to the size of its terms.
static double err_scaled(const std::vector<float>& a, const std::vector<double>& r,
                         double scale) {
  double s = 0;
  for (double v : r) s = std::max(s, std::fabs(v));
  return err(a, r) * std::max(s, 1e-300) / std::max(s, scale);
}

static double term_scale(const std::vector<float>& gamma, const std::vector<double>& rstd,
                         const std::vector<double>& g) {
  double a = 0, b = 0;
  for (size_t j = 0; j < gamma.size(); ++j) a = std::max(a, std::fabs(gamma[j] * rstd[j]));
  for (double v : g) b = std::max(b, std::fabs(v));
  return a * b;
}

static void check(const std::string& what, double e, double tol) {
  ++checks;
  const bool ok = e <= tol;
  if (!ok) ++failures;
  printf("%s %-72s err %.2e (tol %.0e)\n", ok ? "ok  " : "FAIL", what.c_str(), e, tol);
}

template <typename T>
const char* tname();
template <>
const char* tname<float>() {
  return "f32";
}
template <>
const char* tname<__nv_bfloat16>() {
  return "bf16";
}
template <typename T>
double tol() {
  return sizeof(T) == 4 ? 1e-5 : 1e-2;
}

// The block shape the Rust side gives the row-and-channel kernels (nn.rs `rows_grid`), with the
// grid capped small: the grid-stride loop covers the rest, and the emulator stays quick.
static void rows_launch(int64_t rows, int64_t c, std::function<void()> body) {
  unsigned bx = 32;
  while (bx < c && bx < 256) bx *= 2;
  const unsigned by = 256 / bx;
  const unsigned blocks = unsigned(std::min<int64_t>(std::max<int64_t>((rows + by - 1) / by, 1), 3));
  emu_launch({blocks}, {bx, by}, body);
}

// ---- batch norm (kernels/train/batchnorm.cu) ---------------------------------------------------------

#define BN_KERNELS(T, SUF)                                                                       \
  struct BnKernels_##SUF {                                                                       \
    static constexpr auto partial = bn_stats_partial_##SUF;                                      \
    static constexpr auto final_ = bn_stats_final_##SUF;                                         \
    static constexpr auto apply = bn_apply_##SUF;                                                \
    static constexpr auto bwd_partial = bn_bwd_partial_##SUF;                                    \
    static constexpr auto bwd_apply = bn_bwd_apply_##SUF;                                        \
  };
BN_KERNELS(float, f32)
BN_KERNELS(__nv_bfloat16, bf16)
template <typename T>
struct Bn;
template <>
struct Bn<float> : BnKernels_f32 {};
template <>
struct Bn<__nv_bfloat16> : BnKernels_bf16 {};

template <typename T>
void test_batch_norm(int64_t m, int64_t c, int64_t rows, bool residual, bool relu, uint64_t seed) {
  Rng rng{seed};
  const int64_t chunks = (m + rows - 1) / rows;
  const float eps = 1e-5f, momentum = 0.1f;
  auto x = rounded<T>(randn(rng, m * c, 3.f, 1.5f));
  auto r = rounded<T>(randn(rng, m * c));
  auto dy = rounded<T>(randn(rng, m * c));
  auto gamma = randn(rng, c), beta = randn(rng, c);
  std::vector<float> rmean = randn(rng, c), rvar(c);
  for (auto& v : rvar) v = 0.5f + float(rng.uniform());
  auto xt = conv<T>(x), rt = conv<T>(r), dyt = conv<T>(dy);
  auto yt = poisoned<T>(m * c);
  std::vector<float> partial(3 * chunks * c, NAN), mean(c, NAN), rstd(c, NAN);
  auto rm = rmean, rv = rvar;
  emu_launch({unsigned((c + 31) / 32), unsigned(chunks)}, {32, 8},
             [&] { Bn<T>::partial(xt.data(), partial.data(), m, c, rows); });
  // The final merges: 32 threads per channel, 8 channels a block (batchnorm.cu, merge_grid).
  emu_launch({unsigned((c + 7) / 8)}, {256}, [&] {
    Bn<T>::final_(xt.data(), partial.data(), chunks, m, c, eps, momentum, 1, mean.data(),
                  rstd.data(), rm.data(), rv.data());
  });
  rows_launch(m, c, [&] {
    Bn<T>::apply(xt.data(), mean.data(), rstd.data(), gamma.data(), beta.data(),
                 residual ? rt.data() : nullptr, yt.data(), m, c, relu ? 1 : 0);
  });
  // Reference.
  std::vector<double> mu(c), rs(c), y(m * c), rm_ref(c), rv_ref(c);
  for (int64_t j = 0; j < c; ++j) {
    double s = 0, q = 0;
    for (int64_t i = 0; i < m; ++i) s += x[i * c + j];
    mu[j] = s / m;
    for (int64_t i = 0; i < m; ++i) q += (x[i * c + j] - mu[j]) * (x[i * c + j] - mu[j]);
    const double var = q / m;
    rs[j] = 1.0 / sqrt(var + eps);
    rm_ref[j] = (1 - momentum) * rmean[j] + momentum * mu[j];
    rv_ref[j] = (1 - momentum) * rvar[j] + momentum * var * (m > 1 ? double(m) / (m - 1) : 1.0);
  }
  for (int64_t i = 0; i < m * c; ++i) {
    const int64_t j = i % c;
    double v = (x[i] - mu[j]) * rs[j] * gamma[j] + beta[j] + (residual ? r[i] : 0.0);
    y[i] = relu ? std::max(v, 0.0) : v;
  }
  const std::string tag = std::string("batch norm ") + tname<T>() + " " + std::to_string(m) +
                          "x" + std::to_string(c) + " chunk " + std::to_string(rows) +
                          (residual ? " +res" : "") + (relu ? " relu" : "");
  check(tag + " forward", err(back(yt), y), tol<T>());
  check(tag + " running mean", err(rm, rm_ref), 1e-5);
  check(tag + " running var", err(rv, rv_ref), 1e-5);

  // Backward; the mask comes from the kernel's own output, as in training.
  auto ydev = back(yt);
  std::vector<float> bpart(2 * chunks * c, NAN), coef(2 * c, NAN);
  auto prior_g = randn(rng, c), prior_b = randn(rng, c);
  auto dg = prior_g, db = prior_b;
  auto dxt = poisoned<T>(m * c);
  auto prior_res = rounded<T>(randn(rng, m * c));
  auto drt = conv<T>(prior_res);
  const bool accum = residual && (seed % 2 == 0);
  emu_launch({unsigned((c + 31) / 32), unsigned(chunks)}, {32, 8}, [&] {
    Bn<T>::bwd_partial(dyt.data(), relu ? yt.data() : nullptr, xt.data(), mean.data(),
                       rstd.data(), bpart.data(), m, c, rows);
  });
  emu_launch({unsigned((c + 7) / 8)}, {256},
             [&] { bn_bwd_final(bpart.data(), chunks, m, c, dg.data(), db.data(), coef.data()); });
  rows_launch(m, c, [&] {
    Bn<T>::bwd_apply(dyt.data(), relu ? yt.data() : nullptr, xt.data(), mean.data(), rstd.data(),
                     gamma.data(), coef.data(), dxt.data(), residual ? drt.data() : nullptr,
                     accum ? 1 : 0, m, c);
  });
  std::vector<double> sg(c, 0), sgx(c, 0), g(m * c), dx(m * c), dres(m * c), dg_ref(c), db_ref(c);
  for (int64_t i = 0; i < m * c; ++i) {
    const int64_t j = i % c;
    g[i] = (relu && !(ydev[i] > 0.f)) ? 0.0 : dy[i];
    sg[j] += g[i];
    sgx[j] += g[i] * (x[i] - mu[j]) * rs[j];
  }
  for (int64_t j = 0; j < c; ++j) {
    dg_ref[j] = prior_g[j] + sgx[j];
    db_ref[j] = prior_b[j] + sg[j];
  }
  for (int64_t i = 0; i < m * c; ++i) {
    const int64_t j = i % c;
    const double xh = (x[i] - mu[j]) * rs[j];
    dx[i] = gamma[j] * rs[j] * (g[i] - sg[j] / m - xh * sgx[j] / m);
    dres[i] = (accum ? prior_res[i] : 0.0) + g[i];
  }
  check(tag + " dx", err_scaled(back(dxt), dx, term_scale(gamma, rs, g)), tol<T>());
  check(tag + " dgamma", err(dg, dg_ref), 1e-5);
  check(tag + " dbeta", err(db, db_ref), 1e-5);
  if (residual) check(tag + (accum ? " dres (added)" : " dres"), err(back(drt), dres), tol<T>());

  // Evaluation: running statistics in, nothing moved.
  std::vector<float> emean(c, NAN), erstd(c, NAN);
  auto ye = poisoned<T>(m * c);
  emu_launch({1}, {256},
             [&] { bn_eval_stats(rmean.data(), rvar.data(), c, eps, emean.data(), erstd.data()); });
  emu_launch({3}, {64}, [&] {
    Bn<T>::apply(xt.data(), emean.data(), erstd.data(), gamma.data(), beta.data(),
                 residual ? rt.data() : nullptr, ye.data(), m, c, relu ? 1 : 0);
  });
  std::vector<double> yref(m * c);
  for (int64_t i = 0; i < m * c; ++i) {
    const int64_t j = i % c;
    double v = (x[i] - rmean[j]) / sqrt(double(rvar[j]) + eps) * gamma[j] + beta[j] +
               (residual ? r[i] : 0.0);
    yref[i] = relu ? std::max(v, 0.0) : v;
  }
  check(tag + " eval forward", err(back(ye), yref), tol<T>());
}

// ---- standardization (kernels/loss/standardize.cu) --------------------------------------------------

template <typename T>
void test_standardize_affine(int64_t n, int64_t d, bool relu, uint64_t seed) {
  Rng rng{seed};
  const float eps = 1e-5f, momentum = 0.1f;
  // |mean| ≫ std: the mean is kept as an f32 pair, so x − mean stays exact.
  auto x = rounded<T>(randn(rng, n * d, 2.f, -7.f));
  auto dy = rounded<T>(randn(rng, n * d));
  auto gamma = randn(rng, d), beta = randn(rng, d);
  std::vector<float> rm(d, 0.f), rv(d, 1.f), stats(3 * d, NAN);
  auto xt = conv<T>(x), dyt = conv<T>(dy);
  auto yt = poisoned<T>(n * d);
  emu_launch({unsigned((d + 31) / 32)}, {32, 8}, [&] {
    if constexpr (sizeof(T) == 4)
      standardize_affine_fwd_f32(xt.data(), yt.data(), stats.data(), n, d, eps, gamma.data(),
                                 beta.data(), relu, momentum, rm.data(), rv.data());
    else
      standardize_affine_fwd_bf16(xt.data(), yt.data(), stats.data(), n, d, eps, gamma.data(),
                                  beta.data(), relu, momentum, rm.data(), rv.data());
  });
  std::vector<double> mu(d), rs(d), y(n * d), rm_ref(d), rv_ref(d);
  for (int64_t j = 0; j < d; ++j) {
    double s = 0, q = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i * d + j];
    mu[j] = s / n;
    for (int64_t i = 0; i < n; ++i) q += (x[i * d + j] - mu[j]) * (x[i * d + j] - mu[j]);
    rs[j] = 1.0 / sqrt(q / n + eps);
    rm_ref[j] = momentum * mu[j];
    rv_ref[j] = (1 - momentum) + momentum * (q / n) * (n > 1 ? double(n) / (n - 1) : 1.0);
  }
  for (int64_t i = 0; i < n * d; ++i) {
    const int64_t j = i % d;
    const double v = (x[i] - mu[j]) * rs[j] * gamma[j] + beta[j];
    y[i] = relu ? std::max(v, 0.0) : v;
  }
  const std::string tag = std::string("standardize affine ") + tname<T>() + " " +
                          std::to_string(n) + "x" + std::to_string(d) + (relu ? " relu" : "");
  check(tag + " forward", err(back(yt), y), tol<T>());
  check(tag + " running mean", err(rm, rm_ref), 1e-5);
  check(tag + " running var", err(rv, rv_ref), 1e-5);

  auto ydev = back(yt);
  std::vector<float> dg(d, 0.5f), db(d, -0.25f);
  auto dxt = poisoned<T>(n * d);
  emu_launch({unsigned((d + 31) / 32)}, {32, 8}, [&] {
    if constexpr (sizeof(T) == 4)
      standardize_affine_bwd_f32(dyt.data(), relu ? yt.data() : nullptr, xt.data(), stats.data(),
                                 gamma.data(), dxt.data(), dg.data(), db.data(), n, d);
    else
      standardize_affine_bwd_bf16(dyt.data(), relu ? yt.data() : nullptr, xt.data(),
                                  stats.data(), gamma.data(), dxt.data(), dg.data(), db.data(), n,
                                  d);
  });
  std::vector<double> sg(d, 0), sgx(d, 0), g(n * d), dx(n * d), dg_ref(d), db_ref(d);
  for (int64_t i = 0; i < n * d; ++i) {
    const int64_t j = i % d;
    g[i] = (relu && !(ydev[i] > 0.f)) ? 0.0 : dy[i];
    sg[j] += g[i];
    sgx[j] += g[i] * (x[i] - mu[j]) * rs[j];
  }
  for (int64_t j = 0; j < d; ++j) {
    dg_ref[j] = 0.5 + sgx[j];
    db_ref[j] = -0.25 + sg[j];
  }
  for (int64_t i = 0; i < n * d; ++i) {
    const int64_t j = i % d;
    const double xh = (x[i] - mu[j]) * rs[j];
    dx[i] = gamma[j] * rs[j] * (g[i] - sg[j] / n - xh * sgx[j] / n);
  }
  check(tag + " dx", err_scaled(back(dxt), dx, term_scale(gamma, rs, g)), tol<T>());
  check(tag + " dgamma", err(dg, dg_ref), 1e-5);
  check(tag + " dbeta", err(db, db_ref), 1e-5);
}

// Synchronized batch norm (f32, ReLU and residual): the rows cut into two "ranks", each stage's
// sums added on the host between launches as the collectives add them; against the double
// reference of the whole batch. dγ and dβ: each rank adds its own share.
void test_batch_norm_sync(int64_t m, int64_t c, int64_t cut, uint64_t seed) {
  Rng rng{seed};
  const float eps = 1e-5f, momentum = 0.1f;
  auto x = randn(rng, m * c, 3.f, 1.5f), r = randn(rng, m * c), dy = randn(rng, m * c);
  auto gamma = randn(rng, c), beta = randn(rng, c);
  std::vector<float> rm(c, 0.f), rv(c, 1.f);
  const int64_t rows[2] = {cut, m - cut}, at[2] = {0, cut * c};
  const unsigned tiles = unsigned((c + 31) / 32), small = unsigned((c + 255) / 256);
  std::vector<double> sums(c, 0), sq(c, 0), bsum(2 * c, 0);
  for (int k = 0; k < 2; ++k) {
    std::vector<double> part(c, NAN);
    emu_launch({tiles}, {32, 8}, [&] { bn_sync_sums_f32(x.data() + at[k], part.data(), rows[k], c); });
    for (int64_t j = 0; j < c; ++j) sums[j] += part[j];
  }
  for (int k = 0; k < 2; ++k) {
    std::vector<double> part(c, NAN);
    emu_launch({tiles}, {32, 8}, [&] {
      bn_sync_centered_f32(x.data() + at[k], sums.data(), 1.0 / m, part.data(), rows[k], c);
    });
    for (int64_t j = 0; j < c; ++j) sq[j] += part[j];
  }
  std::vector<float> mean(c, NAN), rstd(c, NAN), y(m * c, NAN), dx(m * c, NAN), coef(2 * c, NAN);
  emu_launch({small}, {256}, [&] {
    bn_sync_stats(sums.data(), sq.data(), m, c, eps, momentum, mean.data(), rstd.data(), rm.data(),
                  rv.data());
  });
  for (int k = 0; k < 2; ++k)
    rows_launch(rows[k], c, [&] {
      bn_apply_f32(x.data() + at[k], mean.data(), rstd.data(), gamma.data(), beta.data(),
                   r.data() + at[k], y.data() + at[k], rows[k], c, 1);
    });
  std::vector<float> dg(c, 0.f), db(c, 0.f);
  for (int k = 0; k < 2; ++k) {
    std::vector<double> part(2 * c, NAN);
    emu_launch({tiles}, {32, 8}, [&] {
      bn_bwd_sums_f32(dy.data() + at[k], y.data() + at[k], x.data() + at[k], mean.data(),
                      rstd.data(), part.data(), rows[k], c);
    });
    emu_launch({small}, {256}, [&] { bn_sync_params(part.data(), c, dg.data(), db.data()); });
    for (int64_t j = 0; j < 2 * c; ++j) bsum[j] += part[j];
  }
  emu_launch({small}, {256}, [&] { bn_sync_coef(bsum.data(), m, c, coef.data()); });
  for (int k = 0; k < 2; ++k)
    rows_launch(rows[k], c, [&] {
      bn_bwd_apply_f32(dy.data() + at[k], y.data() + at[k], x.data() + at[k], mean.data(),
                       rstd.data(), gamma.data(), coef.data(), dx.data() + at[k], nullptr, 0,
                       rows[k], c);
    });
  // Reference.
  std::vector<double> mu(c), rs(c), yr(m * c), rmr(c), rvr(c), sg(c, 0), sgx(c, 0), dxr(m * c);
  for (int64_t j = 0; j < c; ++j) {
    double sx = 0, q = 0;
    for (int64_t i = 0; i < m; ++i) sx += x[i * c + j];
    mu[j] = sx / m;
    for (int64_t i = 0; i < m; ++i) q += (x[i * c + j] - mu[j]) * (x[i * c + j] - mu[j]);
    rs[j] = 1.0 / sqrt(q / m + eps);
    rmr[j] = momentum * mu[j];
    rvr[j] = (1 - momentum) + momentum * (q / m) * (double(m) / (m - 1));
  }
  for (int64_t i = 0; i < m * c; ++i) {
    const int64_t j = i % c;
    yr[i] = std::max((x[i] - mu[j]) * rs[j] * gamma[j] + beta[j] + r[i], 0.0);
  }
  std::vector<double> gv(m * c);
  for (int64_t i = 0; i < m * c; ++i) {
    const int64_t j = i % c;
    gv[i] = y[i] > 0.f ? dy[i] : 0.0;
    sg[j] += gv[i];
    sgx[j] += gv[i] * (x[i] - mu[j]) * rs[j];
  }
  for (int64_t i = 0; i < m * c; ++i) {
    const int64_t j = i % c;
    dxr[i] = gamma[j] * rs[j] * (gv[i] - sg[j] / m - (x[i] - mu[j]) * rs[j] * sgx[j] / m);
  }
  const std::string tag = "batch norm synchronized f32 " + std::to_string(cut) + "+" +
                          std::to_string(m - cut) + "x" + std::to_string(c) + " +res relu";
  check(tag + " forward", err(y, yr), 1e-5);
  check(tag + " running mean", err(rm, rmr), 1e-5);
  check(tag + " running var", err(rv, rvr), 1e-5);
  check(tag + " dx", err_scaled(dx, dxr, term_scale(gamma, rs, gv)), 1e-5);
  check(tag + " dgamma", err(dg, sgx), 1e-5);
  check(tag + " dbeta", err(db, sg), 1e-5);
}

// The loss's own standardization (no affine) and its backward, f32.
void test_standardize_loss(int64_t n, int64_t d, uint64_t seed) {
  Rng rng{seed};
  const float eps = 1e-5f;
  auto z = randn(rng, n * d, 0.01f, 100.f);
  auto g = randn(rng, n * d);
  std::vector<float> zhat(n * d, NAN), stats(3 * d, NAN), dz(n * d, NAN);
  emu_launch({unsigned((d + 31) / 32)}, {32, 8}, [&] {
    standardize_fwd_f32_f32(z.data(), zhat.data(), stats.data(), n, d, eps, 0);
  });
  emu_launch({unsigned((d + 31) / 32)}, {32, 8},
             [&] { standardize_bwd_f32(g.data(), z.data(), stats.data(), dz.data(), n, d); });
  std::vector<double> zh(n * d), dzr(n * d);
  for (int64_t j = 0; j < d; ++j) {
    double s = 0, q = 0, sg = 0, sgx = 0;
    for (int64_t i = 0; i < n; ++i) s += z[i * d + j];
    const double mu = s / n;
    for (int64_t i = 0; i < n; ++i) q += (z[i * d + j] - mu) * (z[i * d + j] - mu);
    const double rs = 1.0 / sqrt(q / n + eps);
    for (int64_t i = 0; i < n; ++i) {
      zh[i * d + j] = (z[i * d + j] - mu) * rs;
      sg += g[i * d + j];
      sgx += g[i * d + j] * zh[i * d + j];
    }
    for (int64_t i = 0; i < n; ++i)
      dzr[i * d + j] = rs * (g[i * d + j] - sg / n - zh[i * d + j] * sgx / n);
  }
  const std::string tag =
      "standardize (loss) f32 " + std::to_string(n) + "x" + std::to_string(d) + " |mean|>>std";
  check(tag + " forward", err(zhat, zh), 1e-5);
  check(tag + " backward", err(dz, dzr), 1e-5);
}

// The standardization of a batch split across ranks (standardize_split.cu), f32: the rows cut in
// two "ranks" of unequal size, each stage's per-column sums added on the host between launches,
// as the distributed loss adds them with collectives; against the double reference of the whole.
void test_standardize_split(int64_t n, int64_t d, int64_t cut, uint64_t seed) {
  Rng rng{seed};
  const float eps = 1e-5f;
  auto z = randn(rng, n * d, 0.01f, 100.f);
  auto g = randn(rng, n * d);
  const int64_t rows[2] = {cut, n - cut};
  const int64_t start[2] = {0, cut};
  const unsigned blocks = unsigned((d + 31) / 32);
  const double inv = 1.0 / n;
  std::vector<double> sums(d, 0), sq(d, 0), gsum(2 * d, 0);
  for (int r = 0; r < 2; ++r) {
    std::vector<double> part(d, NAN);
    emu_launch({blocks}, {32, 8},
               [&] { column_sums_f32(z.data() + start[r] * d, part.data(), rows[r], d); });
    for (int64_t j = 0; j < d; ++j) sums[j] += part[j];
  }
  for (int r = 0; r < 2; ++r) {
    std::vector<double> part(d, NAN);
    emu_launch({blocks}, {32, 8}, [&] {
      centered_squares_f32(z.data() + start[r] * d, sums.data(), inv, part.data(), rows[r], d);
    });
    for (int64_t j = 0; j < d; ++j) sq[j] += part[j];
  }
  std::vector<float> zhat(n * d, NAN), dz(n * d, NAN);
  std::vector<std::vector<float>> stats(2, std::vector<float>(3 * d, NAN));
  for (int r = 0; r < 2; ++r)
    emu_launch({blocks}, {32, 8}, [&] {
      standardize_apply_f32_f32(z.data() + start[r] * d, sums.data(), sq.data(), inv, eps,
                                stats[r].data(), zhat.data() + start[r] * d, rows[r], d, 0);
    });
  for (int r = 0; r < 2; ++r) {
    std::vector<double> part(2 * d, NAN);
    emu_launch({blocks}, {32, 8}, [&] {
      std_bwd_sums_f32(g.data() + start[r] * d, z.data() + start[r] * d, stats[r].data(),
                       part.data(), rows[r], d);
    });
    for (int64_t j = 0; j < 2 * d; ++j) gsum[j] += part[j];
  }
  for (int r = 0; r < 2; ++r)
    emu_launch({blocks}, {32, 8}, [&] {
      std_bwd_apply_f32(g.data() + start[r] * d, z.data() + start[r] * d, stats[r].data(),
                        gsum.data(), inv, dz.data() + start[r] * d, rows[r], d);
    });
  std::vector<double> zh(n * d), dzr(n * d);
  for (int64_t j = 0; j < d; ++j) {
    double s = 0, q = 0, sg = 0, sgx = 0;
    for (int64_t i = 0; i < n; ++i) s += z[i * d + j];
    const double mu = s / n;
    for (int64_t i = 0; i < n; ++i) q += (z[i * d + j] - mu) * (z[i * d + j] - mu);
    const double rs = 1.0 / sqrt(q / n + eps);
    for (int64_t i = 0; i < n; ++i) {
      zh[i * d + j] = (z[i * d + j] - mu) * rs;
      sg += g[i * d + j];
      sgx += g[i * d + j] * zh[i * d + j];
    }
    for (int64_t i = 0; i < n; ++i)
      dzr[i * d + j] = rs * (g[i * d + j] - sg / n - zh[i * d + j] * sgx / n);
  }
  const std::string tag = "standardize (split " + std::to_string(cut) + "+" +
                          std::to_string(n - cut) + ") f32 " + std::to_string(n) + "x" +
                          std::to_string(d) + " |mean|>>std";
  check(tag + " forward", err(zhat, zh), 1e-5);
  check(tag + " backward", err(dz, dzr), 1e-5);
}

// ---- the loss reduction (kernels/loss/loss_reduce.cu) -----------------------------------------------

void test_loss_reduce(int64_t d, int vec, uint64_t seed) {
  Rng rng{seed};
  const float lambda = 0.0051f;
  auto c = randn(rng, d * d, 0.3f);
  for (int64_t i = 0; i < d; ++i) c[i * d + i] = 0.8f + 0.1f * float(rng.normal());
  auto cin = c;  // the gradient is written over C in place
  const unsigned blocks = 3;
  std::vector<float> partials(2 * blocks, NAN);
  std::vector<double> out(3, NAN);
  emu_launch({blocks}, {256}, [&] {
    loss_reduce_partial_f32(cin.data(), 1, partials.data(), d, lambda, vec, 0);
  });
  emu_launch({1}, {256}, [&] { loss_reduce_final(partials.data(), blocks, lambda, out.data()); });
  std::vector<float> c16 = c;
  std::vector<__nv_bfloat16> g16 = poisoned<__nv_bfloat16>(d * d);
  std::vector<float> partials16(2 * blocks, NAN);
  emu_launch({blocks}, {256}, [&] {
    loss_reduce_partial_bf16(c16.data(), g16.data(), partials16.data(), d, lambda, vec);
  });
  double on = 0, off = 0;
  std::vector<double> grad(d * d);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      const double v = c[i * d + j];
      if (i == j) {
        on += (1 - v) * (1 - v);
        grad[i * d + j] = 2 * (v - 1);
      } else {
        off += v * v;
        grad[i * d + j] = 2 * double(lambda) * v;
      }
    }
  const std::string tag = "loss reduction d=" + std::to_string(d) + (vec ? " float4" : "");
  check(tag + " on-diagonal", std::fabs(out[0] - on) / on, 1e-6);
  check(tag + " off-diagonal", std::fabs(out[1] - lambda * off) / (lambda * off), 1e-6);
  check(tag + " total", std::fabs(out[2] - on - lambda * off) / (on + lambda * off), 1e-6);
  check(tag + " dL/dC in place", err(cin, grad), 1e-6);
  check(tag + " dL/dC bf16", err(back(g16), grad), 1e-2);
}

// ---- the Gram path (kernels/loss/gram.cu) -------------------------------------------------------------

void test_gram(int64_t n, int64_t d, uint64_t seed) {
  Rng rng{seed};
  const double lambda = 0.0051;
  auto a = randn(rng, n * d), b = randn(rng, n * d);
  // Cᵢᵢ's partial dots over chunks of rows: three chunks, the last one short.
  const int64_t rows_per_chunk = (n + 2) / 3, chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<double> cii(chunks * d, NAN);
  emu_launch({unsigned((d + 31) / 32), unsigned(chunks)}, {32, 8},
             [&] { gram_diag_f32(a.data(), b.data(), cii.data(), n, d, rows_per_chunk); });
  // Ga, Gb (N×N) on the host, as cuBLAS would make them.
  std::vector<float> ga(n * n), gb(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < n; ++k) {
      double sa = 0, sb = 0;
      for (int64_t j = 0; j < d; ++j) {
        sa += double(a[i * d + j]) * a[k * d + j];
        sb += double(b[i * d + j]) * b[k * d + j];
      }
      ga[i * n + k] = float(sa);
      gb[i * n + k] = float(sb);
    }
  const unsigned blocks = 2;
  std::vector<double> partials(blocks, NAN), out(3, NAN);
  std::vector<float> coef(d, NAN);
  emu_launch({blocks}, {256},
             [&] { gram_dot_partial(ga.data(), gb.data(), partials.data(), n * n, 0); });
  emu_launch({1}, {256}, [&] {
    gram_final(partials.data(), blocks, cii.data(), chunks, n, d, lambda, out.data(),
               coef.data());
  });
  std::vector<float> init(n * d, NAN);
  emu_launch({unsigned((n * d + 255) / 256)}, {256},
             [&] { gram_grad_init_f32(b.data(), coef.data(), init.data(), n, d); });
  // Reference through C itself.
  std::vector<double> cref(d * d, 0.0), ciir(d), coefr(d), initr(n * d);
  double on = 0, off = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double s = 0;
      for (int64_t r = 0; r < n; ++r) s += double(a[r * d + i]) * b[r * d + j];
      s /= n;
      if (i == j) {
        ciir[i] = s;
        on += (1 - s) * (1 - s);
        coefr[i] = (2 * (s - 1) - 2 * lambda * s) / n;
      } else {
        off += s * s;
      }
    }
  for (int64_t i = 0; i < n * d; ++i) initr[i] = b[i] * coefr[i % d];
  // Cᵢᵢ from the chunks' partial dots, as gram_final adds them.
  std::vector<float> ciif(d, 0.f);
  for (int64_t i = 0; i < d; ++i) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += cii[k * d + i];
    ciif[i] = float(sum / n);
  }
  const std::string tag = "gram path " + std::to_string(n) + "x" + std::to_string(d);
  check(tag + " C_ii", err(ciif, ciir), 1e-12 + 1e-6);
  check(tag + " on-diagonal", std::fabs(out[0] - on) / on, 1e-6);
  check(tag + " off-diagonal", std::fabs(out[1] - lambda * off) / (lambda * off), 1e-5);
  check(tag + " gradient init", err(init, initr), 1e-6);
}

// ---- pooling (kernels/train/pool.cu) ---------------------------------------------------------------------

template <typename T>
void test_pools(int64_t n, int64_t h, int64_t w, int64_t c, uint64_t seed) {
  Rng rng{seed};
  const int64_t ho = (h + 2 - 3) / 2 + 1, wo = (w + 2 - 3) / 2 + 1;
  auto x = rounded<T>(randn(rng, n * h * w * c));
  auto dy = rounded<T>(randn(rng, n * ho * wo * c));
  auto xt = conv<T>(x), dyt = conv<T>(dy);
  auto yt = poisoned<T>(n * ho * wo * c);
  std::vector<uint8_t> arg(n * ho * wo * c, 255);
  auto dxt = poisoned<T>(n * h * w * c);
  rows_launch(n * ho * wo, c, [&] {
    if constexpr (sizeof(T) == 4)
      maxpool_fwd_f32(xt.data(), yt.data(), arg.data(), n, h, w, c, ho, wo);
    else
      maxpool_fwd_bf16(xt.data(), yt.data(), arg.data(), n, h, w, c, ho, wo);
  });
  rows_launch(n * h * w, c, [&] {
    if constexpr (sizeof(T) == 4)
      maxpool_bwd_f32(dyt.data(), arg.data(), dxt.data(), n, h, w, c, ho, wo);
    else
      maxpool_bwd_bf16(dyt.data(), arg.data(), dxt.data(), n, h, w, c, ho, wo);
  });
  std::vector<double> y(n * ho * wo * c), dx(n * h * w * c, 0.0);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oy = 0; oy < ho; ++oy)
      for (int64_t ox = 0; ox < wo; ++ox)
        for (int64_t ch = 0; ch < c; ++ch) {
          double best = 0;
          int64_t at = -1;
          for (int64_t ky = 0; ky < 3; ++ky)
            for (int64_t kx = 0; kx < 3; ++kx) {
              const int64_t iy = oy * 2 + ky - 1, ix = ox * 2 + kx - 1;
              if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
              const int64_t i = ((b * h + iy) * w + ix) * c + ch;
              if (at < 0 || x[i] > best) {
                best = x[i];
                at = i;
              }
            }
          const int64_t o = ((b * ho + oy) * wo + ox) * c + ch;
          y[o] = best;
          dx[at] += dy[o];
        }
  const std::string tag = std::string("pools ") + tname<T>() + " " + std::to_string(n) + "x" +
                          std::to_string(h) + "x" + std::to_string(w) + "x" + std::to_string(c);
  check(tag + " max forward", err(back(yt), y), tol<T>());
  check(tag + " max backward", err(back(dxt), dx), tol<T>());
  const int64_t hw = h * w;
  auto at = poisoned<T>(n * c);
  auto dp = rounded<T>(randn(rng, n * c));
  auto dpt = conv<T>(dp);
  auto dat = poisoned<T>(n * hw * c);
  emu_launch({1}, {64}, [&] {
    if constexpr (sizeof(T) == 4)
      avgpool_fwd_f32(xt.data(), at.data(), n, hw, c);
    else
      avgpool_fwd_bf16(xt.data(), at.data(), n, hw, c);
  });
  rows_launch(n * hw, c, [&] {
    if constexpr (sizeof(T) == 4)
      avgpool_bwd_f32(dpt.data(), dat.data(), n, hw, c);
    else
      avgpool_bwd_bf16(dpt.data(), dat.data(), n, hw, c);
  });
  std::vector<double> avg(n * c, 0.0), davg(n * hw * c);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t p = 0; p < hw; ++p)
      for (int64_t ch = 0; ch < c; ++ch) {
        avg[b * c + ch] += double(x[(b * hw + p) * c + ch]) / hw;
        davg[(b * hw + p) * c + ch] = double(dp[b * c + ch]) / hw;
      }
  check(tag + " avg forward", err(back(at), avg), tol<T>());
  check(tag + " avg backward", err(back(dat), davg), tol<T>());
}

// ---- LARS (kernels/train/lars.cu) ----------------------------------------------------------------------

void test_lars(int steps) {
  Rng rng{42};
  struct T {
    int64_t len;
    bool vector;
    bool zero;
  };
  const std::vector<T> tensors = {{90000, false, false}, {17, true, false}, {135, false, false},
                                  {70000, true, false},  {16, false, true}};
  const int chunk = 65536;
  std::vector<int64_t> cs;
  std::vector<int> cl, ct, tv, fc, nc;
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    total = (total + 7) / 8 * 8;  // as the trainer aligns weights
    fc.push_back(int(cs.size()));
    for (int64_t k = 0; k < tensors[t].len; k += chunk) {
      cs.push_back(total + k);
      cl.push_back(int(std::min<int64_t>(chunk, tensors[t].len - k)));
      ct.push_back(int(t));
    }
    nc.push_back(int(cs.size()) - fc.back());
    tv.push_back(tensors[t].vector ? 1 : 0);
    total += tensors[t].len;
  }
  std::vector<float> w(total, 0.f), mom(total, 0.f), g(total), work(total, NAN);
  for (size_t t = 0; t < tensors.size(); ++t)
    if (!tensors[t].zero)
      for (int k = fc[t]; k < fc[t] + nc[t]; ++k)
        for (int i = 0; i < cl[k]; ++i) w[cs[k] + i] = float(rng.normal());
  std::vector<double> wr(w.begin(), w.end()), mr(total, 0.0);
  const float wd = 1.5e-6f, eta = 1e-3f, m = 0.9f;
  std::vector<float> partial(2 * cs.size(), NAN), trust(tensors.size(), NAN);
  for (int step = 0; step < steps; ++step) {
    for (auto& v : g) v = float(rng.normal());
    const float lw = 0.2f + 0.1f * step, lb = 0.005f;
    const unsigned chunks = unsigned(cs.size());
    emu_launch({chunks}, {256}, [&] {
      lars_partial(w.data(), g.data(), cs.data(), cl.data(), ct.data(), tv.data(), wd,
                   partial.data());
    });
    emu_launch({1}, {256}, [&] {
      lars_trust(partial.data(), fc.data(), nc.data(), tv.data(), int64_t(tensors.size()), eta,
                 trust.data());
    });
    emu_launch({chunks}, {256}, [&] {
      lars_update_f32(w.data(), g.data(), mom.data(), cs.data(), cl.data(), ct.data(), tv.data(),
                      trust.data(), wd, lw, lb, m, work.data());
    });
    for (size_t t = 0; t < tensors.size(); ++t) {
      const bool vec = tensors[t].vector;
      double ww = 0, dd = 0;
      for (int k = fc[t]; k < fc[t] + nc[t]; ++k)
        for (int i = 0; i < cl[k]; ++i) {
          const int64_t j = cs[k] + i;
          const double d = g[j] + (vec ? 0.0 : wd * wr[j]);
          ww += wr[j] * wr[j];
          dd += d * d;
        }
      const double q = (!vec && ww > 0 && dd > 0) ? eta * sqrt(ww) / sqrt(dd) : 1.0;
      for (int k = fc[t]; k < fc[t] + nc[t]; ++k)
        for (int i = 0; i < cl[k]; ++i) {
          const int64_t j = cs[k] + i;
          const double d = (g[j] + (vec ? 0.0 : wd * wr[j])) * q;
          mr[j] = m * mr[j] + d;
          wr[j] -= (vec ? lb : lw) * mr[j];
        }
    }
    check("LARS step " + std::to_string(step) + " weights", err(w, wr), 1e-6);
    check("LARS step " + std::to_string(step) + " momentum", err(mom, mr), 1e-5);
    // The working copy inside the tensors (the alignment gaps between them are never touched).
    std::vector<float> wk;
    std::vector<double> wkr;
    for (size_t k = 0; k < cs.size(); ++k)
      for (int i = 0; i < cl[k]; ++i) {
        wk.push_back(work[cs[k] + i]);
        wkr.push_back(wr[cs[k] + i]);
      }
    check("LARS step " + std::to_string(step) + " f32 working copy", err(wk, wkr), 1e-6);
  }
}

// ---- conversions (kernels/train/convert.cu) --------------------------------------------------------------

void test_convert() {
  Rng rng{7};
  const int64_t n = 1001;
  auto src = randn(rng, n);
  std::vector<__nv_bfloat16> b16 = poisoned<__nv_bfloat16>(n);
  emu_launch({2}, {128}, [&] { cast_f32_bf16(src.data(), b16.data(), n); });
  std::vector<double> r(src.begin(), src.end());
  check("cast f32 -> bf16", err(back(b16), r), 4e-3);
  auto acc = randn(rng, n);
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = double(acc[i]) + __bfloat162float(b16[i]);
  emu_launch({2}, {128}, [&] { accumulate_bf16_f32(b16.data(), acc.data(), n); });
  check("accumulate bf16 into f32", err(acc, want), 1e-6);
  auto acc2 = randn(rng, n);
  std::vector<double> want2(n);
  for (int64_t i = 0; i < n; ++i) want2[i] = double(acc2[i]) + src[i];
  emu_launch({2}, {128}, [&] { accumulate_f32_f32(src.data(), acc2.data(), n); });
  check("accumulate f32 into f32", err(acc2, want2), 1e-6);
}

// ---- the naive baseline (kernels/bench/naive.cu): the reference loss op by op ----------------------

void test_naive(int64_t n, int64_t d, uint64_t seed) {
  Rng rng{seed};
  const float eps = 1e-5f;
  auto z = randn(rng, n * d, 1.5f, 0.5f);
  auto g = randn(rng, n * d);
  auto lin = [](int64_t len) { return Dim3{unsigned((len + 63) / 64)}; };
  std::vector<float> mean(d, NAN), var(d, NAN), zhat(n * d, NAN), s1(d, NAN), gx(n * d, NAN),
      s2(d, NAN), dz(n * d, NAN);
  emu_launch(lin(d), {64}, [&] { naive_col_mean(z.data(), mean.data(), n, d); });
  emu_launch(lin(d), {64}, [&] { naive_col_var(z.data(), mean.data(), var.data(), n, d); });
  emu_launch(lin(n * d), {64},
             [&] { naive_normalize(z.data(), mean.data(), var.data(), zhat.data(), n, d, eps); });
  emu_launch(lin(d), {64}, [&] { naive_col_sum(g.data(), s1.data(), n, d); });
  emu_launch(lin(n * d), {64}, [&] { naive_mul(g.data(), zhat.data(), gx.data(), n * d); });
  emu_launch(lin(d), {64}, [&] { naive_col_sum(gx.data(), s2.data(), n, d); });
  emu_launch(lin(n * d), {64}, [&] {
    naive_bn_bwd(g.data(), zhat.data(), var.data(), s1.data(), s2.data(), dz.data(), n, d, eps);
  });
  std::vector<double> zh(n * d), dzr(n * d);
  for (int64_t j = 0; j < d; ++j) {
    double s = 0, q = 0, sg = 0, sgx = 0;
    for (int64_t i = 0; i < n; ++i) s += z[i * d + j];
    const double mu = s / n;
    for (int64_t i = 0; i < n; ++i) q += (z[i * d + j] - mu) * (z[i * d + j] - mu);
    const double rs = 1.0 / sqrt(q / n + eps);
    for (int64_t i = 0; i < n; ++i) {
      zh[i * d + j] = (z[i * d + j] - mu) * rs;
      sg += g[i * d + j];
      sgx += g[i * d + j] * zh[i * d + j];
    }
    for (int64_t i = 0; i < n; ++i)
      dzr[i * d + j] = rs * (g[i * d + j] - sg / n - zh[i * d + j] * sgx / n);
  }
  const std::string tag = "naive " + std::to_string(n) + "x" + std::to_string(d);
  check(tag + " normalize", err(zhat, zh), 1e-5);
  check(tag + " batch-norm backward", err(dz, dzr), 1e-4);

  // The loss's pieces on a D×D matrix: diagonal and off-diagonal copies and scatters, affine,
  // square, two-stage sum, bf16 cast.
  auto c = randn(rng, d * d);
  std::vector<float> diag(d, NAN), off(d * (d - 1), NAN), back_(d * d, NAN), sq(d * (d - 1), NAN),
      aff(d, NAN), parts(2, NAN), total(1, NAN);
  emu_launch(lin(d), {64}, [&] { naive_diag_copy(c.data(), diag.data(), d); });
  emu_launch(lin(d * (d - 1)), {64}, [&] { naive_off_diag_copy(c.data(), off.data(), d); });
  emu_launch(lin(d), {64}, [&] { naive_diag_scatter(diag.data(), back_.data(), d); });
  emu_launch(lin(d * (d - 1)), {64}, [&] { naive_off_diag_scatter(off.data(), back_.data(), d); });
  emu_launch(lin(d), {64}, [&] { naive_affine(diag.data(), aff.data(), d, -1.f, 1.f); });
  emu_launch(lin(d * (d - 1)), {64}, [&] { naive_square(off.data(), sq.data(), d * (d - 1)); });
  emu_launch({2}, {256}, [&] { naive_sum_partial(sq.data(), parts.data(), d * (d - 1)); });
  emu_launch({1}, {256}, [&] { naive_sum_final(parts.data(), total.data(), 2); });
  std::vector<__nv_bfloat16> c16 = poisoned<__nv_bfloat16>(d * d);
  emu_launch(lin(d * d), {64}, [&] { naive_cast_bf16(c.data(), c16.data(), d * d); });
  std::vector<double> diag_r(d), off_r, aff_r(d), c_r(c.begin(), c.end());
  double ssq = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      if (i == j) {
        diag_r[i] = c[i * d + j];
        aff_r[i] = 1.0 - c[i * d + j];
      } else {
        off_r.push_back(c[i * d + j]);
        ssq += double(c[i * d + j]) * c[i * d + j];
      }
    }
  check(tag + " diagonal copy", err(diag, diag_r), 0);
  check(tag + " off-diagonal copy (row-major order)", err(off, off_r), 0);
  check(tag + " scatters rebuild C", err(back_, c_r), 0);
  check(tag + " 1 - diagonal", err(aff, aff_r), 1e-7);
  check(tag + " sum of squares", std::fabs(total[0] - ssq) / ssq, 1e-5);
  check(tag + " bf16 cast", err(back(c16), c_r), 4e-3);
}

int main() {
  uint64_t seed = 1;
#ifndef BARLOW_EMU_REDUCED
  // (rows M, channels C, rows per chunk): one chunk, uneven chunks, many chunks of a tall matrix.
  const int64_t shapes[][3] = {{37, 5, 37}, {37, 5, 7}, {300, 70, 64}, {1000, 3, 13}, {2, 33, 1}};
  for (auto& s : shapes)
    for (int v = 0; v < 3; ++v) {
      const bool residual = v == 2, relu = v >= 1;
      test_batch_norm<float>(s[0], s[1], s[2], residual, relu, seed++);
      test_batch_norm<__nv_bfloat16>(s[0], s[1], s[2], residual, relu, seed++);
    }
  const int64_t dense[][2] = {{2, 5}, {7, 33}, {300, 70}};
  for (auto& s : dense)
    for (int relu = 0; relu < 2; ++relu) {
      test_standardize_affine<float>(s[0], s[1], relu, seed++);
      test_standardize_affine<__nv_bfloat16>(s[0], s[1], relu, seed++);
    }
  test_standardize_loss(67, 41, seed++);
  test_standardize_split(67, 41, 30, 9001);
  test_batch_norm_sync(50, 37, 21, 9004);
  test_standardize_split(2, 33, 1, 9002);
  test_loss_reduce(7, 0, seed++);
  test_loss_reduce(40, 1, seed++);
  test_gram(9, 13, seed++);
  test_gram(20, 6, seed++);
  const int64_t pools[][4] = {{2, 7, 9, 3}, {1, 1, 1, 2}, {2, 13, 6, 17}};
  for (auto& p : pools) {
    test_pools<float>(p[0], p[1], p[2], p[3], seed++);
    test_pools<__nv_bfloat16>(p[0], p[1], p[2], p[3], seed++);
  }
  test_lars(3);
  test_convert();
  test_naive(37, 11, seed++);
  test_naive(2, 64, seed++);
#else
  // Still odd shapes, still multi-block grids, and each kernel crosses a block boundary at least
  // once (a tile of 32 columns, a row chunk, a block of rows or elements).
  // Batch norm, one shape per arm (plain, ReLU, residual + ReLU): one chunk; 37 channels over two
  // column tiles in three uneven chunks; M = 2 in one-row chunks. The residual arm runs once
  // written (f32, odd seed) and once added (bf16, even seed).
  const int64_t shapes[][3] = {{37, 5, 37}, {13, 37, 5}, {2, 33, 1}};
  for (int v = 0; v < 3; ++v) {
    const bool residual = v == 2, relu = v >= 1;
    test_batch_norm<float>(shapes[v][0], shapes[v][1], shapes[v][2], residual, relu, seed++);
    test_batch_norm<__nv_bfloat16>(shapes[v][0], shapes[v][1], shapes[v][2], residual, relu,
                                   seed++);
  }
  for (int relu = 0; relu < 2; ++relu) {
    test_standardize_affine<float>(7, 33, relu, seed++);
    test_standardize_affine<__nv_bfloat16>(7, 33, relu, seed++);
  }
  test_standardize_loss(67, 41, seed++);
  test_standardize_split(9, 37, 4, 9003);
  test_batch_norm_sync(9, 37, 4, 9005);
  test_loss_reduce(7, 0, seed++);
  test_loss_reduce(40, 1, seed++);
  test_gram(21, 37, seed++);  // two column tiles, two dot blocks, four init blocks
  const int64_t pools[][4] = {{2, 7, 9, 3}, {1, 1, 1, 2}};
  for (auto& p : pools) {
    test_pools<float>(p[0], p[1], p[2], p[3], seed++);
    test_pools<__nv_bfloat16>(p[0], p[1], p[2], p[3], seed++);
  }
  test_lars(1);
  test_convert();
  test_naive(37, 11, seed++);
#endif
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
