//! Per-plane moments of an activation, the batch norm's statistics gathered one image at a time:
//! a convolution computes them right after writing an image (while it is in cache), so the norm
//! need not read its input again for its statistics.
//!
//! Each plane (one image, one channel) gives three f32 sums about its own rounded mean `c`:
//! Σx, Σ(x − c) and Σ(x − c)². They combine across planes in f64 without cancellation:
//! Σ(x − μ)² = Σ(x − c)² + 2(c − μ)·Σ(x − c) + hw·(c − μ)², exact whatever rounding `c` carries.

use rayon::prelude::*;

/// Floats of moments per plane: Σx, Σ(x − c), Σ(x − c)².
pub const PER_PLANE: usize = 3;

/// Σ f(v) over a plane in 16 f32 lanes (vectorizes; planes are short, so f32 is accurate enough).
#[inline(always)]
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
    fold(acc)
}

/// The 16 lanes added pairwise (a short dependency chain: planes of 4×4 are one vector each).
#[inline(always)]
fn fold(mut acc: [f32; 16]) -> f32 {
    for half in [8, 4, 2, 1] {
        for k in 0..half {
            acc[k] += acc[k + half];
        }
    }
    acc[0]
}

/// Σ(v − c) and Σ(v − c)² over a plane in one read, 16 f32 lanes each.
#[inline(always)]
fn centered_sums(p: &[f32], c: f32) -> (f32, f32) {
    let (mut a1, mut a2) = ([0f32; 16], [0f32; 16]);
    let mut it = p.chunks_exact(16);
    for ch in &mut it {
        for k in 0..16 {
            let d = ch[k] - c;
            a1[k] += d;
            a2[k] += d * d;
        }
    }
    for (k, &v) in it.remainder().iter().enumerate() {
        let d = v - c;
        a1[k] += d;
        a2[k] += d * d;
    }
    (fold(a1), fold(a2))
}

/// The plane's rounded mean, the centre of its other two moments (recomputed, not stored, by
/// whoever combines them).
#[inline(always)]
pub fn center(sum: f32, hw: usize) -> f32 {
    sum / hw as f32
}

vectorized! {
/// The moments of every plane of one image xi [c, hw] into out [c · PER_PLANE].
pub fn image_moments(hw: usize, xi: &[f32], out: &mut [f32]) {
    if hw == 1 {
        // A 1-D norm's "planes" are single values: their own centre, nothing about it.
        for (&v, m) in xi.iter().zip(out.chunks_exact_mut(PER_PLANE)) {
            m.copy_from_slice(&[v, 0.0, 0.0]);
        }
        return;
    }
    for (plane, m) in xi.chunks_exact(hw).zip(out.chunks_exact_mut(PER_PLANE)) {
        let s = lane_sum(plane, |v| v);
        let c = center(s, hw);
        let (d1, d2) = centered_sums(plane, c);
        m.copy_from_slice(&[s, d1, d2]);
    }
}
}

/// Runs `f(state, yi, xi, mi)` over the `n` images of y [n, out_len] and x [n, in_len] in
/// parallel, `mi` being image i's `c · PER_PLANE` moments when `moments` is given.
#[allow(clippy::too_many_arguments)]
pub fn for_each_image<S>(
    n: usize,
    (y, out_len): (&mut [f32], usize),
    (x, in_len): (&[f32], usize),
    moments: Option<(&mut [f32], usize)>,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, &mut [f32], &[f32], Option<&mut [f32]>) + Sync + Send,
) {
    let images = y[..n * out_len]
        .par_chunks_mut(out_len)
        .zip(x[..n * in_len].par_chunks(in_len));
    match moments {
        Some((mo, c)) => images
            .zip(mo[..n * c * PER_PLANE].par_chunks_mut(c * PER_PLANE))
            .for_each_init(init, |st, ((yi, xi), mi)| f(st, yi, xi, Some(mi))),
        None => images.for_each_init(init, |st, (yi, xi)| f(st, yi, xi, None)),
    }
}

/// Per channel, Σx over all planes of `moments` [n, c, PER_PLANE], in f64, images in order.
pub fn channel_sums(c: usize, moments: &[f32]) -> Vec<f64> {
    let mut s = vec![0f64; c];
    for img in moments.chunks_exact(c * PER_PLANE) {
        for (acc, m) in s.iter_mut().zip(img.chunks_exact(PER_PLANE)) {
            *acc += f64::from(m[0]);
        }
    }
    s
}

/// Per channel, Σ(x − mean)² over all planes of `moments`, in f64, images in order.
pub fn channel_squares(c: usize, hw: usize, moments: &[f32], mean: &[f32]) -> Vec<f64> {
    let mut q = vec![0f64; c];
    for img in moments.chunks_exact(c * PER_PLANE) {
        for ((acc, m), &mu) in q.iter_mut().zip(img.chunks_exact(PER_PLANE)).zip(mean) {
            let d = f64::from(center(m[0], hw)) - f64::from(mu);
            *acc += f64::from(m[2]) + 2.0 * d * f64::from(m[1]) + hw as f64 * d * d;
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Mean and variance from the moments against a float64 reference, with |mean| ≫ std and
    /// planes whose lengths are not multiples of the lanes.
    #[test]
    fn combine_to_the_float64_statistics() {
        let (n, c, hw) = (7, 3, 45);
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..n * c * hw)
            .map(|i| {
                let shift = [0.0, 1e3, -37.5][(i / hw) % c];
                (shift + 0.5 * rng.normal()) as f32
            })
            .collect();
        let mut moments = vec![f32::NAN; n * c * PER_PLANE];
        for (xi, mi) in x
            .chunks_exact(c * hw)
            .zip(moments.chunks_exact_mut(c * PER_PLANE))
        {
            image_moments(hw, xi, mi);
        }
        let m = (n * hw) as f64;
        let mean: Vec<f32> = channel_sums(c, &moments)
            .iter()
            .map(|s| (s / m) as f32)
            .collect();
        let var: Vec<f64> = channel_squares(c, hw, &moments, &mean)
            .iter()
            .map(|q| q / m)
            .collect();
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| x[(i * c + ch) * hw..][..hw].iter().map(|&v| f64::from(v)))
                .collect();
            let mu = vals.iter().sum::<f64>() / m;
            let va = vals.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / m;
            let em = (f64::from(mean[ch]) - mu).abs() / mu.abs().max(1.0);
            let ev = (var[ch] - va).abs() / va;
            assert!(em <= 1e-6, "mean[{ch}]: {} vs {mu} ({em:.1e})", mean[ch]);
            assert!(ev <= 1e-5, "var[{ch}]: {} vs {va} ({ev:.1e})", var[ch]);
        }
    }
}
