//! The CPU batch norm in as few passes over the activations as the arithmetic allows: statistics
//! in two reads of x (a sum, then the squares about the mean, which do not cancel), one pass that
//! normalizes, adds the shortcut and clamps, and a backward of one pass for the sums (masking the
//! gradient by the fused ReLU on the way) and one for the input gradient. x̂ is never stored: the
//! backward recomputes it from x and the batch statistics.
//!
//! The statistics' sums are f32 within a plane (at most a few thousand values, in 16 lanes) and f64
//! across planes; the backward's, which cancel, are f64 throughout. Both run over a fixed split of
//! the batch, so they do not depend on how many threads ran them.

use crate::cpu::batch_chunk;
use rayon::prelude::*;

/// Σ of a plane in 16 f32 lanes (vectorizes; short sums, so f32 is accurate enough).
#[inline]
fn lane_sum(p: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = p.chunks_exact(16);
    for c in &mut it {
        for k in 0..16 {
            acc[k] += f(c[k]);
        }
    }
    for (k, &v) in it.remainder().iter().enumerate() {
        acc[k] += f(v);
    }
    acc.iter().sum()
}

/// Σ over a plane of f(a, b) for two planes of equal length, in 8 f64 lanes: the backward's sums
/// cancel to a small fraction of their terms, so they are kept exact to f64 rounding.
#[inline]
fn lane_sum2_f64(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut ia = a.chunks_exact(8);
    let mut ib = b.chunks_exact(8);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for k in 0..8 {
            acc[k] += f(f64::from(ca[k]), f64::from(cb[k]));
        }
    }
    for (k, (&u, &v)) in ia.remainder().iter().zip(ib.remainder()).enumerate() {
        acc[k] += f(f64::from(u), f64::from(v));
    }
    acc.iter().sum()
}

/// Adds per-chunk partials in chunk order.
fn add_partials(partials: Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    let mut out = vec![0f64; len];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// Per channel of x [n, c, hw]: Σ f(ch, x) (f32 per plane, f64 across planes).
pub(crate) fn channel_sums(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    f: impl Fn(usize, f32) -> f32 + Sync,
) -> Vec<f64> {
    let item = c * hw;
    let per = batch_chunk(n);
    let partials = x[..n * item]
        .par_chunks(per * item)
        .map(|xs| {
            let mut s = vec![0f64; c];
            for xi in xs.chunks_exact(item) {
                for (ch, plane) in xi.chunks_exact(hw).enumerate() {
                    s[ch] += f64::from(lane_sum(plane, |v| f(ch, v)));
                }
            }
            s
        })
        .collect();
    add_partials(partials, c)
}

/// Biased batch mean and variance per channel of x [n, c, hw], over `m` values (n·hw here; more
/// when `reduce` sums the partial sums over other ranks' rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn channel_stats(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    m: f64,
    reduce: &dyn Fn(&mut [f64]),
    mean: &mut [f32],
    var: &mut [f32],
) {
    let mut s = channel_sums(n, c, hw, x, |_, v| v);
    reduce(&mut s);
    for (mu, s) in mean[..c].iter_mut().zip(&s) {
        *mu = (s / m) as f32;
    }
    let mu = &mean[..c];
    let mut q = channel_sums(n, c, hw, x, |ch, v| (v - mu[ch]) * (v - mu[ch]));
    reduce(&mut q);
    for (va, q) in var[..c].iter_mut().zip(&q) {
        *va = (q / m) as f32;
    }
}

/// The normalization applied to x [n, c, hw] in one pass: y = (x − mean)·rstd·γ + β, plus the
/// shortcut when given, clamped at zero when `relu`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    (mean, rstd): (&[f32], &[f32]),
    (gamma, beta): (&[f32], &[f32]),
    residual: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let item = c * hw;
    let lo = if relu { 0.0 } else { f32::NEG_INFINITY };
    let row = |yi: &mut [f32], xi: &[f32], ri: Option<&[f32]>| {
        for ch in 0..c {
            let (m, a, b) = (mean[ch], rstd[ch] * gamma[ch], beta[ch]);
            let span = ch * hw..(ch + 1) * hw;
            let (yp, xp) = (&mut yi[span.clone()], &xi[span.clone()]);
            match ri {
                Some(ri) => {
                    for ((o, &v), &r) in yp.iter_mut().zip(xp).zip(&ri[span]) {
                        *o = ((v - m) * a + b + r).max(lo);
                    }
                }
                None => {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        *o = ((v - m) * a + b).max(lo);
                    }
                }
            }
        }
    };
    let (y, x) = (&mut y[..n * item], &x[..n * item]);
    match residual {
        Some(r) => y
            .par_chunks_mut(item)
            .zip(x.par_chunks(item))
            .zip(r[..n * item].par_chunks(item))
            .for_each(|((yi, xi), ri)| row(yi, xi, Some(ri))),
        None => y
            .par_chunks_mut(item)
            .zip(x.par_chunks(item))
            .for_each(|(yi, xi)| row(yi, xi, None)),
    }
}

/// The backward's sums per channel, as [Σdy, Σdy·x̂] pairs (f64) over this batch, after zeroing dy
/// in place where the fused ReLU's output `relu_out` was not positive (the gradient that reaches
/// the norm, and a residual's shortcut, is the masked one).
pub(crate) fn grad_sums(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    (mean, rstd): (&[f32], &[f32]),
    relu_out: Option<&[f32]>,
    dy: &mut [f32],
) -> Vec<f64> {
    let item = c * hw;
    let per = batch_chunk(n);
    let chunk = |ci: usize, dys: &mut [f32]| {
        let mut s = vec![0f64; 2 * c];
        for (k, dyi) in dys.chunks_exact_mut(item).enumerate() {
            let i = ci * per + k;
            let xi = &x[i * item..][..item];
            if let Some(out) = relu_out {
                // A select, not a branch: the mask is as unpredictable as the signs.
                for (g, &o) in dyi.iter_mut().zip(&out[i * item..][..item]) {
                    *g = if o > 0.0 { *g } else { 0.0 };
                }
            }
            for ch in 0..c {
                let span = ch * hw..(ch + 1) * hw;
                let (gp, xp) = (&dyi[span.clone()], &xi[span]);
                let m = f64::from(mean[ch]);
                s[2 * ch] += lane_sum2_f64(gp, gp, |g, _| g);
                s[2 * ch + 1] += lane_sum2_f64(gp, xp, |g, v| g * (v - m));
            }
        }
        s
    };
    let partials = dy[..n * item]
        .par_chunks_mut(per * item)
        .enumerate()
        .map(|(ci, dys)| chunk(ci, dys))
        .collect();
    let mut sums = add_partials(partials, 2 * c);
    for ch in 0..c {
        sums[2 * ch + 1] *= f64::from(rstd[ch]);
    }
    sums
}

/// dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂)), the means being `sums` (from [`grad_sums`],
/// possibly summed over more rows than these) over `m` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn input_grad(
    n: usize,
    c: usize,
    hw: usize,
    sums: &[f64],
    m: f64,
    x: &[f32],
    (mean, rstd): (&[f32], &[f32]),
    gamma: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) {
    let item = c * hw;
    let coef: Vec<(f32, f32, f32)> = (0..c)
        .map(|ch| {
            let (s, sx) = (sums[2 * ch], sums[2 * ch + 1]);
            (
                gamma[ch] * rstd[ch],
                (s / m) as f32,
                (sx / m) as f32 * rstd[ch],
            )
        })
        .collect();
    dx[..n * item]
        .par_chunks_mut(item)
        .zip(dy[..n * item].par_chunks(item))
        .zip(x[..n * item].par_chunks(item))
        .for_each(|((dxi, dyi), xi)| {
            for (ch, &(gr, ms, msx)) in coef.iter().enumerate() {
                let span = ch * hw..(ch + 1) * hw;
                let mu = mean[ch];
                for ((d, &g), &v) in dxi[span.clone()]
                    .iter_mut()
                    .zip(&dyi[span.clone()])
                    .zip(&xi[span])
                {
                    *d = gr * (g - ms - (v - mu) * msx);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(g) - w).abs() / scale;
            assert!(err <= 1e-5, "{what}[{i}]: {g} vs {w} (relative {err:.2e})");
        }
    }

    /// Every pass against a float64 reference on an odd shape, with a shifted mean (|mean| ≫ std
    /// in one channel), a shortcut and the fused ReLU; outputs poisoned with NaN first.
    #[test]
    fn passes_match_a_float64_reference() {
        let (n, c, hw) = (5, 3, 37);
        let len = n * c * hw;
        let mut rng = Rng::new(11);
        let x: Vec<f32> = (0..len)
            .map(|i| {
                let shift = if (i / hw) % c == 1 { 300.0 } else { 0.0 };
                (shift + rng.normal()) as f32
            })
            .collect();
        let r: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
        let dy0: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
        let gamma: Vec<f32> = (0..c).map(|_| 1.0 + 0.3 * rng.normal() as f32).collect();
        let beta: Vec<f32> = (0..c).map(|_| 0.3 * rng.normal() as f32).collect();
        let m = (n * hw) as f64;
        let at = |i: usize, ch: usize, j: usize| (i * c + ch) * hw + j;

        // Reference, per channel in f64.
        let mut mu = vec![0f64; c];
        let mut va = vec![0f64; c];
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| (0..hw).map(move |j| (i, j)))
                .map(|(i, j)| f64::from(x[at(i, ch, j)]))
                .collect();
            mu[ch] = vals.iter().sum::<f64>() / m;
            va[ch] = vals.iter().map(|v| (v - mu[ch]).powi(2)).sum::<f64>() / m;
        }
        let rs: Vec<f64> = va.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let xh = |k: usize| {
            let ch = (k / hw) % c;
            (f64::from(x[k]) - mu[ch]) * rs[ch]
        };
        let y_ref: Vec<f64> = (0..len)
            .map(|k| {
                let ch = (k / hw) % c;
                (xh(k) * f64::from(gamma[ch]) + f64::from(beta[ch]) + f64::from(r[k])).max(0.0)
            })
            .collect();
        let g_ref: Vec<f64> = (0..len)
            .map(|k| {
                if y_ref[k] > 0.0 {
                    f64::from(dy0[k])
                } else {
                    0.0
                }
            })
            .collect();
        let (mut db_ref, mut dg_ref) = (vec![0f64; c], vec![0f64; c]);
        for (k, g) in g_ref.iter().enumerate() {
            let ch = (k / hw) % c;
            db_ref[ch] += g;
            dg_ref[ch] += g * xh(k);
        }
        let dx_ref: Vec<f64> = (0..len)
            .map(|k| {
                let ch = (k / hw) % c;
                f64::from(gamma[ch]) * rs[ch] * (g_ref[k] - db_ref[ch] / m - xh(k) * dg_ref[ch] / m)
            })
            .collect();

        let (mut mean, mut var) = (vec![f32::NAN; c], vec![f32::NAN; c]);
        channel_stats(n, c, hw, &x, m, &|_| {}, &mut mean, &mut var);
        close(&mean, &mu, "mean");
        close(&var, &va, "var");
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let mut y = vec![f32::NAN; len];
        let stats = (mean.as_slice(), rstd.as_slice());
        apply(n, c, hw, &x, stats, (&gamma, &beta), Some(&r), true, &mut y);
        close(&y, &y_ref, "y");
        let mut dy = dy0.clone();
        let sums = grad_sums(n, c, hw, &x, stats, Some(&y), &mut dy);
        close(&dy, &g_ref, "masked dy");
        let dbeta: Vec<f32> = (0..c).map(|ch| sums[2 * ch] as f32).collect();
        let dgamma: Vec<f32> = (0..c).map(|ch| sums[2 * ch + 1] as f32).collect();
        close(&dbeta, &db_ref, "dbeta");
        close(&dgamma, &dg_ref, "dgamma");
        let mut dx = vec![f32::NAN; len];
        input_grad(n, c, hw, &sums, m, &x, stats, &gamma, &dy, &mut dx);
        close(&dx, &dx_ref, "dx");
        // Without the shortcut or the ReLU, the plain norm.
        apply(n, c, hw, &x, stats, (&gamma, &beta), None, false, &mut y);
        let plain: Vec<f64> = (0..len)
            .map(|k| {
                let ch = (k / hw) % c;
                xh(k) * f64::from(gamma[ch]) + f64::from(beta[ch])
            })
            .collect();
        close(&y, &plain, "plain y");
    }
}
