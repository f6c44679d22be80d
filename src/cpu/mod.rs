//! The CPU twin of every CUDA kernel, in f32 with f64 accumulation where sums are long, parallel
//! over rayon's pool. [`reference`](mod@reference) holds the plain float64 version the tests trust.
//!
//! All matrices are row-major; Z is N×D, C is D×D.

/// Defines `fn $name(args)` running `$body` compiled for AVX-512 or AVX2+FMA when the CPU has
/// them, else for the build's baseline: plain loops over 16 f32 lanes then vectorize at the full
/// width of the machine. No fast-math: the results are the same bits on every instruction set.
#[cfg(feature = "train")]
macro_rules! vectorized {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn avx512($($arg: $ty),*) {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) {
                body($($arg),*)
            }
            match $crate::cpu::conv::Isa::detect() {
                // SAFETY: detect() found these features on the running CPU.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::conv::Isa::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::conv::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
#[cfg(feature = "train")]
pub(crate) use vectorized;

// The trainer's CPU engine: direct convolutions, batch-norm moments, recycled buffers.
#[cfg(feature = "train")]
pub mod conv;
mod gemm;
pub mod gram;
#[cfg(feature = "train")]
pub(crate) mod moments;
#[cfg(feature = "train")]
pub(crate) mod pool;
pub mod reference;

pub(crate) use gemm::{matmul, Mat, MatRef};

/// Images per chunk when a reduction over a batch of `n` is split into at most 16 contiguous
/// chunks whose partial sums are added in order: a fixed split, so results do not depend on how
/// many threads ran them.
#[cfg(feature = "train")]
pub(crate) fn batch_chunk(n: usize) -> usize {
    n.div_ceil(16).max(1)
}

use crate::error::Result;
use crate::shape::{check_input, check_output, Dims};
use crate::LossValue;
use rayon::prelude::*;

/// Columns per parallel task when reducing over the batch: wide enough to stream rows, narrow
/// enough to spread D = 128 over two cores.
const COL_CHUNK: usize = 64;

/// Floats of per-column statistics the standardization keeps for backward, per view:
/// `[mean_hi | mean_lo | rstd]`, each D long. The mean is an unevaluated pair (hi + lo) so that
/// `x − mean = (x − hi) − lo` stays exact when |mean| ≫ std.
pub const STATS_PER_COLUMN: usize = 3;

/// Fused batch standardization: per column, the mean and `rstd = 1/sqrt(var + eps)` (biased
/// variance) into `stats`, and `zhat = (z − mean)·rstd`. Two passes in f64.
pub fn standardize_forward(
    z: &[f32],
    dims: Dims,
    eps: f32,
    zhat: &mut [f32],
    stats: &mut [f32],
) -> Result<()> {
    let (n, d) = dims.checked()?;
    check_input("z", z.len(), dims)?;
    check_output("zhat", zhat.len(), n * d)?;
    check_output("stats", stats.len(), STATS_PER_COLUMN * d)?;
    let mean: Vec<f64> = column_sums(z, dims).iter().map(|s| s / n as f64).collect();
    let sq = centered_squares(z, dims, &mean);
    write_stats(&mean, &sq, n, eps, stats);
    apply_standardize(z, dims, stats, zhat);
    Ok(())
}

/// Runs `f` on each chunk of [`COL_CHUNK`] columns of a D-long per-column output, in parallel.
fn per_column(d: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let mut out = vec![0f64; d];
    out.par_chunks_mut(COL_CHUNK)
        .enumerate()
        .for_each(|(chunk, o)| f(chunk * COL_CHUNK, o));
    out
}

/// Per-column Σₙ z\[n,j\] in f64, rows in order. (Sizes checked by the caller.)
pub(crate) fn column_sums(z: &[f32], dims: Dims) -> Vec<f64> {
    let d = dims.d;
    per_column(d, |c0, sum| {
        let w = sum.len();
        for row in z[..dims.n * d].chunks_exact(d) {
            for (s, &x) in sum.iter_mut().zip(&row[c0..c0 + w]) {
                *s += f64::from(x);
            }
        }
    })
}

/// Per-column Σₙ (z\[n,j\] − mean\[j\])² in f64, rows in order.
pub(crate) fn centered_squares(z: &[f32], dims: Dims, mean: &[f64]) -> Vec<f64> {
    let d = dims.d;
    per_column(d, |c0, sq| {
        let mu = &mean[c0..c0 + sq.len()];
        for row in z[..dims.n * d].chunks_exact(d) {
            for ((q, &x), m) in sq.iter_mut().zip(&row[c0..c0 + mu.len()]).zip(mu) {
                let t = f64::from(x) - m;
                *q += t * t;
            }
        }
    })
}

/// `[mean_hi | mean_lo | rstd]` from the mean and the centered squares of `count` rows.
pub(crate) fn write_stats(mean: &[f64], sq: &[f64], count: usize, eps: f32, stats: &mut [f32]) {
    let d = mean.len();
    let (hi, rest) = stats[..STATS_PER_COLUMN * d].split_at_mut(d);
    let (lo, rstd) = rest.split_at_mut(d);
    for j in 0..d {
        hi[j] = mean[j] as f32;
        lo[j] = (mean[j] - f64::from(hi[j])) as f32;
        rstd[j] = (1.0 / (sq[j] / count as f64 + f64::from(eps)).sqrt()) as f32;
    }
}

/// `zhat = (z − mean)·rstd` with the statistics of [`write_stats`].
pub(crate) fn apply_standardize(z: &[f32], dims: Dims, stats: &[f32], zhat: &mut [f32]) {
    let (n, d) = (dims.n, dims.d);
    let (hi, lo, rstd) = split_stats(stats, d);
    zhat[..n * d]
        .par_chunks_mut(d)
        .zip(z.par_chunks_exact(d))
        .for_each(|(out, row)| {
            for j in 0..d {
                out[j] = xhat(row[j], hi[j], lo[j], rstd[j]) as f32;
            }
        });
}

fn split_stats(stats: &[f32], d: usize) -> (&[f32], &[f32], &[f32]) {
    (&stats[..d], &stats[d..2 * d], &stats[2 * d..3 * d])
}

/// `(x − (hi + lo))·rstd` without rounding the mean to one f32.
#[inline]
fn xhat(x: f32, hi: f32, lo: f32, rstd: f32) -> f64 {
    ((f64::from(x) - f64::from(hi)) - f64::from(lo)) * f64::from(rstd)
}

/// Cross-correlation `C = Ẑaᵀ·Ẑb / N` (D×D).
pub fn cross_correlation(za_hat: &[f32], zb_hat: &[f32], dims: Dims, c: &mut [f32]) -> Result<()> {
    dims.checked()?;
    cross_correlation_scaled(za_hat, zb_hat, dims, 1.0 / dims.n as f32, c)
}

/// `C = scale·Ẑaᵀ·Ẑb` (D×D): with `scale` = 1/N, or 1/(total rows) for one rank's share.
pub(crate) fn cross_correlation_scaled(
    za_hat: &[f32],
    zb_hat: &[f32],
    dims: Dims,
    scale: f32,
    c: &mut [f32],
) -> Result<()> {
    // One rank's rows may be a single one; the caller checked the whole batch's shape.
    let (n, d) = (dims.n, dims.d);
    check_input("za_hat", za_hat.len(), dims)?;
    check_input("zb_hat", zb_hat.len(), dims)?;
    check_output("c", c.len(), d * d)?;
    // C[i,j] = Σ_k Ẑa[k,i] Ẑb[k,j]: lhs is Ẑaᵀ, read with swapped strides.
    matmul(
        Mat::new(&mut c[..d * d], d, d, d as isize, 1),
        MatRef::new(za_hat, d, n, 1, d as isize),
        MatRef::new(zb_hat, n, d, d as isize, 1),
        scale,
        false,
        true,
    );
    Ok(())
}

/// The fused reduction: reads C once, returns both loss terms and, when `write_grad`, overwrites C
/// with dL/dC (2(c−1) on the diagonal, 2λc off it). Rows are summed in f64 in a fixed order.
pub fn loss_reduce(c: &mut [f32], d: usize, lambda: f32, write_grad: bool) -> Result<LossValue> {
    if d == 0 {
        return Err(crate::Error::EmptyFeatures);
    }
    let dd = d.checked_mul(d).ok_or_else(|| crate::Error::TooLarge {
        what: format!("D×D with D = {d}"),
    })?;
    check_output("c", c.len(), dd)?;
    let two_lambda = 2.0 * lambda;
    let rows: Vec<(f64, f64)> = c[..dd]
        .par_chunks_mut(d)
        .enumerate()
        .map(|(i, row)| {
            let mut off = 0f64;
            for (j, x) in row.iter_mut().enumerate() {
                if j != i {
                    off += f64::from(*x) * f64::from(*x);
                    if write_grad {
                        *x *= two_lambda;
                    }
                }
            }
            let t = 1.0 - f64::from(row[i]);
            if write_grad {
                row[i] = 2.0 * (row[i] - 1.0);
            }
            (t * t, off)
        })
        .collect();
    let (on, off) = rows
        .iter()
        .fold((0f64, 0f64), |(a, b), (x, y)| (a + x, b + y));
    Ok(LossValue::new(on, f64::from(lambda) * off))
}

/// Backward through the GEMM: `dẐa = Ẑb·Gᵀ / N`, `dẐb = Ẑa·G / N`, with G = dL/dC.
pub fn correlation_backward(
    g: &[f32],
    za_hat: &[f32],
    zb_hat: &[f32],
    dims: Dims,
    dza_hat: &mut [f32],
    dzb_hat: &mut [f32],
) -> Result<()> {
    dims.checked()?;
    let s = 1.0 / dims.n as f32;
    correlation_backward_scaled(g, za_hat, zb_hat, dims, s, dza_hat, dzb_hat)
}

/// [`correlation_backward`] with the 1/N factor given (1/(total rows) for one rank's rows).
pub(crate) fn correlation_backward_scaled(
    g: &[f32],
    za_hat: &[f32],
    zb_hat: &[f32],
    dims: Dims,
    s: f32,
    dza_hat: &mut [f32],
    dzb_hat: &mut [f32],
) -> Result<()> {
    let (n, d) = (dims.n, dims.d);
    check_input("za_hat", za_hat.len(), dims)?;
    check_input("zb_hat", zb_hat.len(), dims)?;
    check_output("g", g.len(), d * d)?;
    check_output("dza_hat", dza_hat.len(), n * d)?;
    check_output("dzb_hat", dzb_hat.len(), n * d)?;
    let di = d as isize;
    matmul(
        Mat::new(&mut dza_hat[..n * d], n, d, di, 1),
        MatRef::new(zb_hat, n, d, di, 1),
        MatRef::new(&g[..d * d], d, d, 1, di), // Gᵀ
        s,
        false,
        true,
    );
    matmul(
        Mat::new(&mut dzb_hat[..n * d], n, d, di, 1),
        MatRef::new(za_hat, n, d, di, 1),
        MatRef::new(&g[..d * d], d, d, di, 1),
        s,
        false,
        true,
    );
    Ok(())
}

/// Backward through the standardization:
/// `dz = rstd ⊙ (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))`, x̂ recomputed from z and `stats` (as written
/// by [`standardize_forward`]), column means over the batch.
pub fn standardize_backward(
    g: &[f32],
    z: &[f32],
    stats: &[f32],
    dims: Dims,
    dz: &mut [f32],
) -> Result<()> {
    let (n, d) = dims.checked()?;
    check_input("g", g.len(), dims)?;
    check_input("z", z.len(), dims)?;
    check_output("stats", stats.len(), STATS_PER_COLUMN * d)?;
    check_output("dz", dz.len(), n * d)?;
    let (sg, sgx) = grad_sums(g, z, stats, dims);
    let mg: Vec<f64> = sg.iter().map(|v| v / n as f64).collect();
    let mgx: Vec<f64> = sgx.iter().map(|v| v / n as f64).collect();
    apply_standardize_backward(g, z, stats, dims, &mg, &mgx, dz);
    Ok(())
}

/// Per-column Σₙ g and Σₙ g·x̂ over the rows of g and z (in f64, rows in order).
pub(crate) fn grad_sums(g: &[f32], z: &[f32], stats: &[f32], dims: Dims) -> (Vec<f64>, Vec<f64>) {
    let d = dims.d;
    let (hi, lo, rstd) = split_stats(stats, d);
    let mut sg = vec![0f64; d];
    let mut sgx = vec![0f64; d];
    sg.par_chunks_mut(COL_CHUNK)
        .zip(sgx.par_chunks_mut(COL_CHUNK))
        .enumerate()
        .for_each(|(chunk, (mg, mgx))| {
            let c0 = chunk * COL_CHUNK;
            for (grow, zrow) in g[..dims.n * d].chunks_exact(d).zip(z.chunks_exact(d)) {
                for j in 0..mg.len() {
                    let c = c0 + j;
                    let gi = f64::from(grow[c]);
                    mg[j] += gi;
                    mgx[j] += gi * xhat(zrow[c], hi[c], lo[c], rstd[c]);
                }
            }
        });
    (sg, sgx)
}

/// `dz = rstd ⊙ (g − mg − x̂ ⊙ mgx)` with the column means of g and g·x̂ given.
pub(crate) fn apply_standardize_backward(
    g: &[f32],
    z: &[f32],
    stats: &[f32],
    dims: Dims,
    mg: &[f64],
    mgx: &[f64],
    dz: &mut [f32],
) {
    let (n, d) = (dims.n, dims.d);
    let (hi, lo, rstd) = split_stats(stats, d);
    dz[..n * d]
        .par_chunks_mut(d)
        .zip(g.par_chunks_exact(d).zip(z.par_chunks_exact(d)))
        .for_each(|(out, (grow, zrow))| {
            for j in 0..d {
                let x = xhat(zrow[j], hi[j], lo[j], rstd[j]);
                out[j] = (f64::from(rstd[j]) * (f64::from(grow[j]) - mg[j] - x * mgx[j])) as f32;
            }
        });
}
