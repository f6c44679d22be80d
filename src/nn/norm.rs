//! The CPU batch norm in as few passes over the activations as the arithmetic allows: statistics
//! from per-plane moments (gathered by the convolution that wrote x, or in one read of x here),
//! one pass that normalizes, adds the shortcut and clamps, and a backward of one pass for the sums
//! (masking the gradient by the fused ReLU on the way) and one for the input gradient. x̂ is never
//! stored: the backward recomputes it from x and the batch statistics.
//!
//! The statistics' sums are f32 within a plane (at most a few thousand values, in 16 lanes) and f64
//! across planes, in image order; the backward's, which cancel, are f64 throughout, over a fixed
//! split of the batch. Neither depends on how many threads ran them.

use crate::cpu::moments::{channel_squares, channel_sums, image_moments, PER_PLANE};
use crate::cpu::pool::Scratch;
use crate::cpu::{batch_chunk, vectorized};
use rayon::prelude::*;

/// Σg and Σg·(v − m) over a plane of gradients g and inputs v, in 8 f64 lanes each: the
/// backward's sums cancel to a small fraction of their terms, so they are kept exact to f64
/// rounding.
#[inline(always)]
fn grad_plane_sums(g: &[f32], x: &[f32], m: f64) -> (f64, f64) {
    let (mut s, mut sx) = ([0f64; 8], [0f64; 8]);
    let mut ig = g.chunks_exact(8);
    let mut ix = x.chunks_exact(8);
    for (cg, cx) in (&mut ig).zip(&mut ix) {
        for k in 0..8 {
            let gk = f64::from(cg[k]);
            s[k] += gk;
            sx[k] += gk * (f64::from(cx[k]) - m);
        }
    }
    for (k, (&u, &v)) in ig.remainder().iter().zip(ix.remainder()).enumerate() {
        let gk = f64::from(u);
        s[k] += gk;
        sx[k] += gk * (f64::from(v) - m);
    }
    (s.iter().sum(), sx.iter().sum())
}

/// Adds per-chunk partials in chunk order.
fn add_partials(partials: Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    let mut out = vec![0f64; len];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// Biased batch mean and variance per channel of x [n, c, hw], over `m` values (n·hw here; more
/// when `reduce` sums the partial sums over other ranks' rows), from the per-plane moments of x:
/// those a convolution gathered while writing x, or else computed here in one read of x.
#[allow(clippy::too_many_arguments)]
pub(crate) fn channel_stats(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    moments: Option<&[f32]>,
    m: f64,
    reduce: &dyn Fn(&mut [f64]),
    mean: &mut [f32],
    var: &mut [f32],
) {
    let len = n * c * PER_PLANE;
    let own;
    let moments = match moments {
        Some(mo) => &mo[..len],
        None => {
            let mut mo = Scratch::take(len);
            mo.par_chunks_mut(c * PER_PLANE)
                .zip(x[..n * c * hw].par_chunks(c * hw))
                .for_each(|(mi, xi)| image_moments(hw, xi, mi));
            own = mo;
            &own
        }
    };
    let mut s = channel_sums(c, moments);
    reduce(&mut s);
    for (mu, s) in mean[..c].iter_mut().zip(&s) {
        *mu = (s / m) as f32;
    }
    let mut q = channel_squares(c, hw, moments, &mean[..c]);
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
    let scale: Vec<f32> = rstd[..c].iter().zip(gamma).map(|(r, g)| r * g).collect();
    let (y, x) = (&mut y[..n * item], &x[..n * item]);
    let (m, a, b) = (&mean[..c], scale.as_slice(), &beta[..c]);
    match residual {
        Some(r) => y
            .par_chunks_mut(item)
            .zip(x.par_chunks(item))
            .zip(r[..n * item].par_chunks(item))
            .for_each(|((yi, xi), ri)| apply_image(hw, xi, Some(ri), m, a, b, lo, yi)),
        None => y
            .par_chunks_mut(item)
            .zip(x.par_chunks(item))
            .for_each(|(yi, xi)| apply_image(hw, xi, None, m, a, b, lo, yi)),
    }
}

vectorized! {
    /// One image of [`apply`]: y = max((x − mean)·scale + β (+ r), lo), scale = rstd·γ.
    #[allow(clippy::too_many_arguments)]
    fn apply_image(
        hw: usize,
        xi: &[f32],
        ri: Option<&[f32]>,
        mean: &[f32],
        scale: &[f32],
        beta: &[f32],
        lo: f32,
        yi: &mut [f32],
    ) {
        for (ch, ((&m, &a), &b)) in mean.iter().zip(scale).zip(beta).enumerate() {
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
            let out = relu_out.map(|o| &o[i * item..][..item]);
            grad_image(hw, &x[i * item..][..item], out, &mean[..c], dyi, &mut s);
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

vectorized! {
    /// One image of [`grad_sums`]: dy masked by the fused ReLU's output, then its
    /// [Σdy, Σdy·(x − mean)] per channel added to `s`.
    fn grad_image(
        hw: usize,
        xi: &[f32],
        relu_out: Option<&[f32]>,
        mean: &[f32],
        dyi: &mut [f32],
        s: &mut [f64],
    ) {
        if let Some(out) = relu_out {
            // A select, not a branch: the mask is as unpredictable as the signs.
            for (g, &o) in dyi.iter_mut().zip(out) {
                *g = if o > 0.0 { *g } else { 0.0 };
            }
        }
        for (ch, &m) in mean.iter().enumerate() {
            let span = ch * hw..(ch + 1) * hw;
            let (sg, sx) = grad_plane_sums(&dyi[span.clone()], &xi[span], f64::from(m));
            s[2 * ch] += sg;
            s[2 * ch + 1] += sx;
        }
    }
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
        .for_each(|((dxi, dyi), xi)| input_grad_image(hw, &coef, &mean[..c], dyi, xi, dxi));
}

vectorized! {
    /// One image of [`input_grad`], coef being (γ·rstd, mean(dy), mean(dy·x̂)·rstd) per channel.
    fn input_grad_image(
        hw: usize,
        coef: &[(f32, f32, f32)],
        mean: &[f32],
        dyi: &[f32],
        xi: &[f32],
        dxi: &mut [f32],
    ) {
        for (ch, (&(gr, ms, msx), &mu)) in coef.iter().zip(mean).enumerate() {
            let span = ch * hw..(ch + 1) * hw;
            for ((d, &g), &v) in dxi[span.clone()]
                .iter_mut()
                .zip(&dyi[span.clone()])
                .zip(&xi[span])
            {
                *d = gr * (g - ms - (v - mu) * msx);
            }
        }
    }
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
        channel_stats(n, c, hw, &x, None, m, &|_| {}, &mut mean, &mut var);
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
