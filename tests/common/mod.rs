//! Helpers shared by the integration tests: a seeded generator, error measures, GPU discovery.
#![allow(dead_code)]

use barlow::cuda::cudarc::driver::CudaStream;
use std::sync::Arc;

/// SplitMix64: small, seeded, and the same on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// N×D values, each column with its own mean and scale, so that standardization matters.
    pub fn matrix(&mut self, n: usize, d: usize) -> Vec<f32> {
        let shift: Vec<f64> = (0..d).map(|_| 3.0 * self.normal()).collect();
        let scale: Vec<f64> = (0..d).map(|_| 0.5 + 2.0 * self.uniform()).collect();
        let mut z = vec![0f32; n * d];
        for i in 0..n {
            for j in 0..d {
                z[i * d + j] = (shift[j] + scale[j] * self.normal()) as f32;
            }
        }
        z
    }

    /// A second view correlated with `za`, as two augmentations of one image would be.
    pub fn correlated(&mut self, za: &[f32], noise: f64) -> Vec<f32> {
        za.iter()
            .map(|&x| (f64::from(x) * 0.8 + noise * self.normal() + 0.1) as f32)
            .collect()
    }
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Normwise relative error: max |a − r| / max |r|. Robust where single elements are near zero.
pub fn rel_err(a: &[f32], r: &[f64]) -> f64 {
    assert_eq!(a.len(), r.len(), "length mismatch");
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (&x, &y) in a.iter().zip(r) {
        let x = f64::from(x);
        if !x.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((x - y).abs());
        scale = scale.max(y.abs());
    }
    diff / scale.max(1e-300)
}

pub fn rel_err_scalar(a: f64, r: f64) -> f64 {
    if !a.is_finite() {
        return f64::INFINITY;
    }
    (a - r).abs() / r.abs().max(1e-300)
}

#[track_caller]
pub fn assert_close(what: &str, a: &[f32], r: &[f64], tol: f64) {
    let e = rel_err(a, r);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// Like [`rel_err`], but relative to at least `scale`: for results that cancel to far below the
/// magnitude of the terms an f32 computation must add up (see [`grad_scale`]).
pub fn rel_err_scaled(a: &[f32], r: &[f64], scale: f64) -> f64 {
    let max_ref = r.iter().fold(0f64, |m, x| m.max(x.abs()));
    rel_err(a, r) * max_ref.max(1e-300) / max_ref.max(scale).max(1e-300)
}

/// The scale of dL/dZ's terms, rstd·|dL/dẐ|. With N = 2 every standardized column is ±1 whatever
/// Z is, so dL/dZ cancels to eps-level values while its terms stay this large.
pub fn grad_scale(rstd: &[f64], grad_zhat: &[f64]) -> f64 {
    let r = rstd.iter().fold(0f64, |m, x| m.max(x.abs()));
    let g = grad_zhat.iter().fold(0f64, |m, x| m.max(x.abs()));
    r * g
}

#[track_caller]
pub fn assert_close_grad(what: &str, a: &[f32], r: &[f64], scale: f64, tol: f64) {
    let e = rel_err_scaled(a, r, scale);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.0e} (scale {scale:.3e})"
    );
}

/// Checks the loss and both terms against the reference. Each error is relative to the larger of
/// the value and its sensitivity to relative rounding of C, S = Σ |∂L/∂Cᵢⱼ · Cᵢⱼ|: near C ≈ I
/// (and always at N = 2, where every |Cᵢⱼ| ≈ 1) the on-diagonal term (1 − Cᵢᵢ)² is far smaller than
/// what rounding C to f32 alone moves it by, and plain relative error would measure f32, not the code.
#[track_caller]
pub fn assert_loss_close(
    what: &str,
    v: barlow::LossValue,
    r: &barlow::cpu::reference::Reference,
    lambda: f64,
    tol: f64,
) {
    let d = r.a.mean.len();
    let mut s_on = 0f64;
    let mut s_off = 0f64;
    for i in 0..d {
        for j in 0..d {
            let c = r.c[i * d + j];
            if i == j {
                s_on += 2.0 * (1.0 - c).abs() * c.abs();
            } else {
                s_off += 2.0 * lambda * c * c;
            }
        }
    }
    for (name, a, b, s) in [
        ("total", v.total, r.total, s_on + s_off),
        ("on_diag", v.on_diag, r.on_diag, s_on),
        ("off_diag", v.off_diag, r.off_diag, s_off),
    ] {
        let e = if a.is_finite() {
            (a - b).abs() / b.abs().max(s).max(1e-300)
        } else {
            f64::INFINITY
        };
        assert!(
            e <= tol,
            "{what} {name}: {a} vs reference {b}: error {e:.3e} > {tol:.0e}"
        );
    }
}

#[track_caller]
pub fn assert_close_scalar(what: &str, a: f64, r: f64, tol: f64) {
    let e = rel_err_scalar(a, r);
    assert!(
        e <= tol,
        "{what}: {a} vs reference {r}: relative error {e:.3e} > {tol:.0e}"
    );
}

/// The GPU stream for GPU tests, or `None` after printing `SKIP: <reason>`. With
/// `BARLOW_REQUIRE_GPU=1` (set by the GPU bundle's run.sh) a missing GPU fails the test instead.
pub fn gpu(test: &str) -> Option<Arc<CudaStream>> {
    let reason = if !barlow::built_with_kernels() {
        "built without CUDA kernels".to_string()
    } else {
        match barlow::cuda::open_stream(0) {
            Ok(s) => return Some(s),
            Err(e) => e.to_string(),
        }
    };
    if std::env::var("BARLOW_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: BARLOW_REQUIRE_GPU=1 but the GPU cannot be used: {reason}");
    }
    println!("SKIP: {test}: {reason}");
    None
}
