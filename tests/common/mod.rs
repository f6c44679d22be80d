//! Helpers shared by the integration tests: a seeded generator, error measures, GPU discovery.
#![allow(dead_code, unused_imports)]

#[cfg(feature = "cuda")]
use barlow::cuda::cudarc::driver::CudaStream;
#[cfg(feature = "cuda")]
use std::sync::Arc;

pub use barlow::rng::Rng;

/// Runs `f` on another thread and returns its result, failing the test if it has not returned
/// within `secs` (a hang becomes a failure, not a stuck suite).
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not return within {secs} s (hung?)"))
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

/// The on- and off-diagonal terms' sensitivity to relative rounding of C, S = Σ |∂L/∂Cᵢⱼ · Cᵢⱼ|.
pub fn loss_sensitivity(r: &barlow::cpu::reference::Reference, lambda: f64) -> (f64, f64) {
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
    (s_on, s_off)
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
    let (s_on, s_off) = loss_sensitivity(r, lambda);
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
#[cfg(feature = "cuda")]
pub fn gpu(test: &str) -> Option<Arc<CudaStream>> {
    let reason = if !barlow::built_with_kernels() {
        "built without CUDA kernels".to_string()
    } else {
        // A stream alone is not enough: the kernels must load and cuBLAS must be there.
        match barlow::cuda::open_stream(0)
            .and_then(|s| barlow::cuda::ops::CudaOps::new(&s).map(|_| s))
        {
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

/// Streams on `want` devices (device i's default stream), or `None` after printing
/// `SKIP: <reason>`. A missing GPU fails as in [`gpu`]; fewer devices than `want`, or no NCCL,
/// fail only with `BARLOW_REQUIRE_GPUS=<want>` (the virtual device's suite sets it).
#[cfg(feature = "nccl")]
pub fn gpus(test: &str, want: usize) -> Option<Vec<Arc<CudaStream>>> {
    gpu(test)?;
    let reason = match barlow::cuda::device_count() {
        Ok(n) if n < want => format!("needs {want} CUDA devices, found {n}"),
        Ok(_) => match barlow::cuda::nccl::NcclId::new() {
            Ok(_) => {
                let streams = (0..want).map(barlow::cuda::open_stream).collect();
                match streams {
                    Ok(s) => return Some(s),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    if std::env::var("BARLOW_REQUIRE_GPUS").is_ok_and(|v| v.parse().is_ok_and(|n: usize| n >= want))
    {
        panic!("{test}: BARLOW_REQUIRE_GPUS but {reason}");
    }
    println!("SKIP: {test}: {reason}");
    None
}
