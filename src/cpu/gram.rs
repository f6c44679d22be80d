//! The exact loss without the D×D matrix: through the batch Gram matrices Ga = ẐaẐaᵀ and
//! Gb = ẐbẐbᵀ (N×N).
//!
//! * Σᵢⱼ Cᵢⱼ² = ⟨Ga, Gb⟩_F / N², and Cᵢᵢ = (1/N) Σₙ Ẑa\[n,i\]·Ẑb\[n,i\], so
//!   off-diagonal = λ (Σᵢⱼ Cᵢⱼ² − Σᵢ Cᵢᵢ²) and on-diagonal = Σᵢ (1 − Cᵢᵢ)².
//! * dL/dẐa = (2λ/N²)·Gb·Ẑa + Ẑb ⊙ kᵢ and dL/dẐb = (2λ/N²)·Ga·Ẑb + Ẑa ⊙ kᵢ, with the column
//!   factor kᵢ = (2(Cᵢᵢ − 1) − 2λCᵢᵢ)/N.
//!
//! About 8·N²·D flops instead of 6·N·D², and N² memory instead of D²: cheaper when 4N < 3D.
//! The off-diagonal sum is a difference of two numbers near D when C ≈ I; the sums are taken in
//! f64 to keep that difference accurate.

use super::{matmul, Mat, MatRef};
use crate::error::Result;
use crate::shape::{check_input, check_output, Dims};
use crate::LossValue;
use rayon::prelude::*;

/// Column dot products Cᵢᵢ = (1/N) Σₙ a\[n,i\]·b\[n,i\], accumulated in f64.
pub fn diagonal(za_hat: &[f32], zb_hat: &[f32], dims: Dims) -> Result<Vec<f64>> {
    let (n, d) = dims.checked()?;
    check_input("za_hat", za_hat.len(), dims)?;
    check_input("zb_hat", zb_hat.len(), dims)?;
    let chunk = 64;
    let mut out = vec![0f64; d];
    out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
        let c0 = ci * chunk;
        for (ra, rb) in za_hat.chunks_exact(d).zip(zb_hat.chunks_exact(d)).take(n) {
            for (j, v) in o.iter_mut().enumerate() {
                *v += f64::from(ra[c0 + j]) * f64::from(rb[c0 + j]);
            }
        }
        o.iter_mut().for_each(|v| *v /= n as f64);
    });
    Ok(out)
}

/// `g = z·zᵀ` (N×N).
pub fn gram(z_hat: &[f32], dims: Dims, g: &mut [f32]) -> Result<()> {
    let (n, d) = dims.checked()?;
    check_input("z_hat", z_hat.len(), dims)?;
    check_output("g", g.len(), n * n)?;
    matmul(
        Mat::new(&mut g[..n * n], n, n, n as isize, 1),
        MatRef::new(z_hat, n, d, d as isize, 1),
        MatRef::new(z_hat, d, n, 1, d as isize),
        1.0,
        false,
        true,
    );
    Ok(())
}

/// The loss (and, with `grads`, dL/dẐa and dL/dẐb) from standardized inputs through the Gram
/// matrices; `ga` and `gb` are N×N scratch.
#[allow(clippy::too_many_arguments)]
pub fn loss(
    za_hat: &[f32],
    zb_hat: &[f32],
    dims: Dims,
    lambda: f32,
    ga: &mut [f32],
    gb: &mut [f32],
    grads: Option<(&mut [f32], &mut [f32])>,
) -> Result<LossValue> {
    let (n, d) = dims.checked()?;
    check_input("za_hat", za_hat.len(), dims)?;
    check_input("zb_hat", zb_hat.len(), dims)?;
    let all = Rows {
        za: za_hat,
        zb: zb_hat,
        dims,
        rows: 0..n,
    };
    let total_sq = all.forward(ga, gb)? / (n as f64 * n as f64);
    let c = diagonal(za_hat, zb_hat, dims)?;
    let value = value(&c, total_sq, d, lambda);
    if let Some((da, db)) = grads {
        all.backward(&c, lambda, ga, gb, da, db)?;
    }
    Ok(value)
}

/// Both terms from the diagonal of C and Σᵢⱼ Cᵢⱼ².
pub(crate) fn value(c: &[f64], total_sq: f64, d: usize, lambda: f32) -> LossValue {
    let on: f64 = c.iter().map(|v| (1.0 - v) * (1.0 - v)).sum();
    let diag_sq: f64 = c.iter().map(|v| v * v).sum();
    // One column has no off-diagonal term; below zero is a rounding residue of a sum >= 0.
    let off = if d > 1 {
        (total_sq - diag_sq).max(0.0)
    } else {
        0.0
    };
    LossValue::new(on, f64::from(lambda) * off)
}

/// A block of rows of the whole (all ranks') standardized batches, for the Gram path split by
/// rows: the block's rows of Ga and Gb, their part of ⟨Ga, Gb⟩, and the gradient of its rows.
pub(crate) struct Rows<'a> {
    /// Ẑa and Ẑb of the whole batch, `dims.n` × `dims.d`.
    pub za: &'a [f32],
    pub zb: &'a [f32],
    pub dims: Dims,
    /// The block's rows.
    pub rows: std::ops::Range<usize>,
}

impl Rows<'_> {
    /// Writes the block's rows of Ga and Gb (r×N) and returns their part of Σ Ga⊙Gb (f64, rows
    /// in order).
    pub fn forward(&self, ga: &mut [f32], gb: &mut [f32]) -> Result<f64> {
        let (n, d) = (self.dims.n, self.dims.d);
        let r = self.rows.len();
        check_output("ga", ga.len(), r * n)?;
        check_output("gb", gb.len(), r * n)?;
        for (z, g) in [(self.za, &mut *ga), (self.zb, &mut *gb)] {
            matmul(
                Mat::new(&mut g[..r * n], r, n, n as isize, 1),
                MatRef::new(&z[self.rows.start * d..], r, d, d as isize, 1),
                MatRef::new(z, d, n, 1, d as isize),
                1.0,
                false,
                true,
            );
        }
        Ok(ga[..r * n]
            .par_chunks(n)
            .zip(gb[..r * n].par_chunks(n))
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum::<f64>()
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum::<f64>())
    }

    /// dL/dẐa and dL/dẐb of the block's rows (r×D) from the rows of Ga, Gb that
    /// [`Rows::forward`] wrote and the whole batch's diagonal `c`.
    pub fn backward(
        &self,
        c: &[f64],
        lambda: f32,
        ga: &[f32],
        gb: &[f32],
        da: &mut [f32],
        db: &mut [f32],
    ) -> Result<()> {
        let (n, d) = (self.dims.n, self.dims.d);
        let r = self.rows.len();
        check_output("dza_hat", da.len(), r * d)?;
        check_output("dzb_hat", db.len(), r * d)?;
        let lam = f64::from(lambda);
        let k: Vec<f32> = c
            .iter()
            .map(|&v| ((2.0 * (v - 1.0) - 2.0 * lam * v) / n as f64) as f32)
            .collect();
        let s = (2.0 * lam / (n as f64 * n as f64)) as f32;
        let block = self.rows.start * d..self.rows.end * d;
        for (out, g, z, other) in [(da, gb, self.za, self.zb), (db, ga, self.zb, self.za)] {
            // out = other ⊙ k, then out += s·G·z.
            out[..r * d]
                .par_chunks_mut(d)
                .zip(other[block.clone()].par_chunks_exact(d))
                .for_each(|(o, row)| {
                    o.iter_mut()
                        .zip(row)
                        .zip(&k)
                        .for_each(|((o, x), k)| *o = x * k)
                });
            matmul(
                Mat::new(&mut out[..r * d], r, d, d as isize, 1),
                MatRef::new(&g[..r * n], r, n, n as isize, 1),
                MatRef::new(z, n, d, d as isize, 1),
                s,
                true,
                true,
            );
        }
        Ok(())
    }
}
