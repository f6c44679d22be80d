//! The float64 reference: the loss and its gradients written as plainly as possible, one loop per
//! formula, single-threaded. Slow and obviously correct; every fast path is tested against it.

use crate::error::Result;
use crate::shape::{check_input, Dims};

/// Output of [`standardize`]: Ẑ (N×D), column means and reciprocal standard deviations (D).
#[derive(Debug, Clone)]
pub struct Standardized {
    /// Ẑ = (Z − mean)·rstd, N×D.
    pub zhat: Vec<f64>,
    /// Column means, D.
    pub mean: Vec<f64>,
    /// 1/√(biased variance + eps) per column, D.
    pub rstd: Vec<f64>,
}

/// Everything the loss computes, kept for comparison with the fast paths.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The first view, standardized.
    pub a: Standardized,
    /// The second view, standardized.
    pub b: Standardized,
    /// C = ẐaᵀẐb / N, D×D.
    pub c: Vec<f64>,
    /// Σᵢ (1 − Cᵢᵢ)².
    pub on_diag: f64,
    /// λ · Σᵢ≠ⱼ Cᵢⱼ².
    pub off_diag: f64,
    /// on_diag + off_diag.
    pub total: f64,
    /// dL/dC, D×D.
    pub grad_c: Vec<f64>,
    /// dL/dẐa, N×D.
    pub grad_za_hat: Vec<f64>,
    /// dL/dẐb, N×D.
    pub grad_zb_hat: Vec<f64>,
    /// dL/dZa, N×D.
    pub grad_za: Vec<f64>,
    /// dL/dZb, N×D.
    pub grad_zb: Vec<f64>,
}

/// `len` must be `rows × cols` (an N×D input, or D×D for C and its gradient).
fn need(name: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    check_input(name, len, Dims::new(rows, cols))
}

/// Column standardization with biased variance (BatchNorm1d, affine = false, training mode).
pub fn standardize(z: &[f64], n: usize, d: usize, eps: f64) -> Result<Standardized> {
    Dims::new(n, d).checked()?;
    need("z", z.len(), n, d)?;
    let mut mean = vec![0.0; d];
    let mut rstd = vec![0.0; d];
    for j in 0..d {
        let mu = (0..n).map(|i| z[i * d + j]).sum::<f64>() / n as f64;
        let var = (0..n).map(|i| (z[i * d + j] - mu).powi(2)).sum::<f64>() / n as f64;
        mean[j] = mu;
        rstd[j] = 1.0 / (var + eps).sqrt();
    }
    let mut zhat = vec![0.0; n * d];
    for i in 0..n {
        for j in 0..d {
            zhat[i * d + j] = (z[i * d + j] - mean[j]) * rstd[j];
        }
    }
    Ok(Standardized { zhat, mean, rstd })
}

/// C = ẐaᵀẐb / N.
pub fn cross_correlation(za_hat: &[f64], zb_hat: &[f64], n: usize, d: usize) -> Result<Vec<f64>> {
    need("za_hat", za_hat.len(), n, d)?;
    need("zb_hat", zb_hat.len(), n, d)?;
    let mut c = vec![0.0; d * d];
    for k in 0..n {
        for i in 0..d {
            let a = za_hat[k * d + i];
            for j in 0..d {
                c[i * d + j] += a * zb_hat[k * d + j];
            }
        }
    }
    c.iter_mut().for_each(|x| *x /= n as f64);
    Ok(c)
}

/// The two loss terms of C: (Σᵢ (1 − Cᵢᵢ)², λ·Σᵢ≠ⱼ Cᵢⱼ²).
pub fn loss_terms(c: &[f64], d: usize, lambda: f64) -> Result<(f64, f64)> {
    need("c", c.len(), d, d)?;
    let mut on = 0.0;
    let mut off = 0.0;
    for i in 0..d {
        for j in 0..d {
            let x = c[i * d + j];
            if i == j {
                on += (1.0 - x).powi(2);
            } else {
                off += x * x;
            }
        }
    }
    Ok((on, lambda * off))
}

/// dL/dC: 2(Cᵢᵢ − 1) on the diagonal, 2λCᵢⱼ off it.
pub fn loss_grad(c: &[f64], d: usize, lambda: f64) -> Result<Vec<f64>> {
    need("c", c.len(), d, d)?;
    let mut g = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            let x = c[i * d + j];
            g[i * d + j] = if i == j {
                2.0 * (x - 1.0)
            } else {
                2.0 * lambda * x
            };
        }
    }
    Ok(g)
}

/// dẐa = Ẑb·Gᵀ / N and dẐb = Ẑa·G / N.
pub fn correlation_backward(
    g: &[f64],
    za_hat: &[f64],
    zb_hat: &[f64],
    n: usize,
    d: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    need("g", g.len(), d, d)?;
    need("za_hat", za_hat.len(), n, d)?;
    need("zb_hat", zb_hat.len(), n, d)?;
    let mut dza = vec![0.0; n * d];
    let mut dzb = vec![0.0; n * d];
    for k in 0..n {
        for i in 0..d {
            let mut sa = 0.0;
            let mut sb = 0.0;
            for j in 0..d {
                sa += zb_hat[k * d + j] * g[i * d + j];
                sb += za_hat[k * d + j] * g[j * d + i];
            }
            dza[k * d + i] = sa / n as f64;
            dzb[k * d + i] = sb / n as f64;
        }
    }
    Ok((dza, dzb))
}

/// dZ = rstd ⊙ (dẐ − mean(dẐ) − Ẑ ⊙ mean(dẐ ⊙ Ẑ)), means over the batch.
pub fn standardize_backward(g: &[f64], s: &Standardized, n: usize, d: usize) -> Result<Vec<f64>> {
    need("g", g.len(), n, d)?;
    need("zhat", s.zhat.len(), n, d)?;
    need("rstd", s.rstd.len(), 1, d)?;
    let mut dz = vec![0.0; n * d];
    for j in 0..d {
        let mg = (0..n).map(|i| g[i * d + j]).sum::<f64>() / n as f64;
        let mgx = (0..n)
            .map(|i| g[i * d + j] * s.zhat[i * d + j])
            .sum::<f64>()
            / n as f64;
        for i in 0..n {
            let k = i * d + j;
            dz[k] = s.rstd[j] * (g[k] - mg - s.zhat[k] * mgx);
        }
    }
    Ok(dz)
}

/// The loss value only: Σᵢ (1 − Cᵢᵢ)² + λ·Σᵢ≠ⱼ Cᵢⱼ².
pub fn loss(za: &[f64], zb: &[f64], dims: Dims, lambda: f64, eps: f64) -> Result<f64> {
    let (n, d) = dims.checked()?;
    check_input("za", za.len(), dims)?;
    check_input("zb", zb.len(), dims)?;
    let a = standardize(za, n, d, eps)?;
    let b = standardize(zb, n, d, eps)?;
    let c = cross_correlation(&a.zhat, &b.zhat, n, d)?;
    let (on, off) = loss_terms(&c, d, lambda)?;
    Ok(on + off)
}

/// The whole forward and backward pass in f64.
pub fn forward_backward(
    za: &[f64],
    zb: &[f64],
    dims: Dims,
    lambda: f64,
    eps: f64,
) -> Result<Reference> {
    let (n, d) = dims.checked()?;
    check_input("za", za.len(), dims)?;
    check_input("zb", zb.len(), dims)?;
    let a = standardize(za, n, d, eps)?;
    let b = standardize(zb, n, d, eps)?;
    let c = cross_correlation(&a.zhat, &b.zhat, n, d)?;
    let (on_diag, off_diag) = loss_terms(&c, d, lambda)?;
    let grad_c = loss_grad(&c, d, lambda)?;
    let (grad_za_hat, grad_zb_hat) = correlation_backward(&grad_c, &a.zhat, &b.zhat, n, d)?;
    let grad_za = standardize_backward(&grad_za_hat, &a, n, d)?;
    let grad_zb = standardize_backward(&grad_zb_hat, &b, n, d)?;
    Ok(Reference {
        a,
        b,
        c,
        on_diag,
        off_diag,
        total: on_diag + off_diag,
        grad_c,
        grad_za_hat,
        grad_zb_hat,
        grad_za,
        grad_zb,
    })
}
