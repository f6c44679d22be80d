//! GPU parity: every CUDA kernel, each GEMM mode, the whole fused loss and the naive baseline
//! against the float64 reference, on random inputs of odd shapes with outputs poisoned (NaN)
//! first. Without a GPU each test prints `SKIP: <reason>` and returns.
#![cfg(feature = "bench")]

mod common;

use barlow::cpu::reference;
use barlow::cuda::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use barlow::cuda::naive::NaiveLoss;
use barlow::cuda::ops::CudaOps;
use barlow::cuda::{Element, HatElement};
use barlow::{BarlowTwinsLoss, Dims, Error, LossConfig, LossPath, Math};
use common::*;
use half::{bf16, f16};
use std::sync::Arc;

const LAMBDA: f64 = 0.0051;
const EPS: f64 = 1e-5;
const SHAPES: &[(usize, usize)] = &[(2, 1), (33, 7), (100, 129), (67, 4099), (1000, 33)];

fn tol(math: Math) -> f64 {
    match math {
        Math::F32 => 1e-5,
        Math::Tf32 => 1e-3,
        Math::Bf16 => 1e-2,
        other => panic!("no tolerance for {other:?}: give the new mode one here"),
    }
}

/// Host-side conversions for the element types the kernels take.
trait Host: DeviceRepr + Element + Copy {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Relative rounding of one stored value, the floor for any result stored in this type.
    const UNIT: f64;
}
impl Host for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    const UNIT: f64 = 0.0;
}
impl Host for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    const UNIT: f64 = 1e-2;
}
impl Host for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    const UNIT: f64 = 1e-3;
}

/// Rounds to T; returns the device values and the exact f64 values the reference must use.
fn quantize<T: Host>(x: &[f32]) -> (Vec<T>, Vec<f64>) {
    let q: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let e = q.iter().map(|&v| f64::from(v.to_f32())).collect();
    (q, e)
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, x: &[T]) -> CudaSlice<T> {
    s.clone_htod(x).expect("upload")
}

fn down<T: Host>(s: &Arc<CudaStream>, x: &CudaSlice<T>) -> Vec<f32> {
    s.clone_dtoh(x)
        .expect("download")
        .into_iter()
        .map(|v| v.to_f32())
        .collect()
}

fn poisoned<T: Host>(s: &Arc<CudaStream>, len: usize) -> CudaSlice<T> {
    up(s, &vec![T::from_f32(f32::NAN); len])
}

/// Rounds to the nearest TF32 value, as the kernels do for `Math::Tf32`.
fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & 0xFFFF_E000)
}

fn check_standardize<T: Host, O: Host + HatElement>(
    s: &Arc<CudaStream>,
    ops: &CudaOps,
    math: Math,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    for &(n, d) in SHAPES {
        let (zq, z64) = quantize::<T>(&rng.matrix(n, d));
        let r = reference::standardize(&z64, n, d, EPS).unwrap();
        let z = up(s, &zq);
        let mut zhat = poisoned::<O>(s, n * d);
        let mut stats = poisoned::<f32>(s, 3 * d);
        ops.standardize_forward(math, &z, Dims::new(n, d), EPS as f32, &mut zhat, &mut stats)
            .unwrap();
        let what = format!(
            "standardize {:?}→{:?} {math:?} N={n} D={d}",
            T::DTYPE,
            O::DTYPE
        );
        let t = if O::UNIT > 0.0 { O::UNIT } else { tol(math) };
        let zh = down(s, &zhat);
        assert_close(&format!("{what} zhat"), &zh, &r.zhat, t);
        if math == Math::Tf32 {
            assert!(
                zh.iter().all(|&x| round_tf32(x) == x),
                "{what}: Ẑ not TF32-rounded"
            );
        }
        let st = down(s, &stats);
        let mean: Vec<f32> = (0..d).map(|j| st[j] + st[d + j]).collect();
        assert_close(&format!("{what} mean"), &mean, &r.mean, 1e-6);
        assert_close(&format!("{what} rstd"), &st[2 * d..], &r.rstd, 1e-5);
    }
}

#[test]
fn standardize_forward_matches_reference() {
    let Some(s) = gpu("standardize_forward_matches_reference") else {
        return;
    };
    let ops = CudaOps::new(&s).unwrap();
    check_standardize::<f32, f32>(&s, &ops, Math::F32, 10);
    check_standardize::<bf16, f32>(&s, &ops, Math::F32, 11);
    check_standardize::<f16, f32>(&s, &ops, Math::F32, 12);
    check_standardize::<f32, bf16>(&s, &ops, Math::Bf16, 13);
    check_standardize::<bf16, bf16>(&s, &ops, Math::Bf16, 14);
    check_standardize::<f16, bf16>(&s, &ops, Math::Bf16, 15);
    check_standardize::<f32, f32>(&s, &ops, Math::Tf32, 17);
    check_standardize::<bf16, f32>(&s, &ops, Math::Tf32, 18);
}

#[test]
fn standardize_is_exact_when_mean_dwarfs_std() {
    let Some(s) = gpu("standardize_is_exact_when_mean_dwarfs_std") else {
        return;
    };
    let ops = CudaOps::new(&s).unwrap();
    let mut rng = Rng::new(16);
    let (n, d) = (1000, 37);
    let z: Vec<f32> = (0..n * d).map(|_| (1e4 + rng.normal()) as f32).collect();
    let r = reference::standardize(&to_f64(&z), n, d, EPS).unwrap();
    let zd = up(&s, &z);
    let mut zhat = poisoned::<f32>(&s, n * d);
    let mut stats = poisoned::<f32>(&s, 3 * d);
    ops.standardize_forward(
        Math::F32,
        &zd,
        Dims::new(n, d),
        EPS as f32,
        &mut zhat,
        &mut stats,
    )
    .unwrap();
    assert_close("zhat", &down(&s, &zhat), &r.zhat, 1e-5);
    assert_close("rstd", &down(&s, &stats)[2 * d..], &r.rstd, 1e-5);
}

fn check_standardize_backward<T: Host>(s: &Arc<CudaStream>, ops: &CudaOps, seed: u64) {
    let mut rng = Rng::new(seed);
    for &(n, d) in SHAPES {
        let (zq, z64) = quantize::<T>(&rng.matrix(n, d));
        let g: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let r = reference::standardize(&z64, n, d, EPS).unwrap();
        let rdz = reference::standardize_backward(&to_f64(&g), &r, n, d).unwrap();
        let z = up(s, &zq);
        let mut zhat = poisoned::<f32>(s, n * d);
        let mut stats = poisoned::<f32>(s, 3 * d);
        let dims = Dims::new(n, d);
        ops.standardize_forward(Math::F32, &z, dims, EPS as f32, &mut zhat, &mut stats)
            .unwrap();
        let gd = up(s, &g);
        let mut dz = poisoned::<T>(s, n * d);
        ops.standardize_backward(&gd, &z, &stats, dims, &mut dz)
            .unwrap();
        let t = if T::UNIT > 0.0 { T::UNIT } else { 1e-5 };
        let scale = grad_scale(&r.rstd, &to_f64(&g));
        assert_close_grad(
            &format!("standardize_bwd {:?} N={n} D={d}", T::DTYPE),
            &down(s, &dz),
            &rdz,
            scale,
            t,
        );
    }
}

#[test]
fn standardize_backward_matches_reference() {
    let Some(s) = gpu("standardize_backward_matches_reference") else {
        return;
    };
    let ops = CudaOps::new(&s).unwrap();
    check_standardize_backward::<f32>(&s, &ops, 20);
    check_standardize_backward::<bf16>(&s, &ops, 21);
    check_standardize_backward::<f16>(&s, &ops, 22);
}

/// The GEMMs of one math mode: operands rounded on the host to what the mode's producers write
/// (TF32 for `Math::Tf32`, bf16 for `Math::Bf16`), and the reference built from exactly those
/// rounded values, so the check measures the GEMM alone: its accumulation, and TF32 rounding of
/// operands where the mode applies it.
fn check_gemms<O: Host + HatElement>(
    s: &Arc<CudaStream>,
    ops: &mut CudaOps,
    math: Math,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    for &(n, d) in SHAPES {
        let dims = Dims::new(n, d);
        let a: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let g: Vec<f32> = (0..d * d).map(|_| rng.normal() as f32).collect();
        let pre = |x: &[f32]| -> Vec<f32> {
            if math == Math::Tf32 {
                x.iter().map(|&v| round_tf32(v)).collect()
            } else {
                x.to_vec()
            }
        };
        let (aq, ae) = quantize::<O>(&pre(&a));
        let (bq, be) = quantize::<O>(&pre(&b));
        let (gq, ge) = quantize::<O>(&pre(&g));
        let (ad, bd, gd) = (up(s, &aq), up(s, &bq), up(s, &gq));
        let what = format!("{math:?} N={n} D={d}");

        let mut c = poisoned::<f32>(s, d * d);
        ops.cross_correlation(math, &ad, &bd, dims, &mut c).unwrap();
        let rc = reference::cross_correlation(&ae, &be, n, d).unwrap();
        assert_close(&format!("{what} C"), &down(s, &c), &rc, tol(math));

        let mut da = poisoned::<f32>(s, n * d);
        let mut db = poisoned::<f32>(s, n * d);
        ops.correlation_backward(math, &gd, &ad, &bd, dims, &mut da, &mut db)
            .unwrap();
        let (ra, rb) = reference::correlation_backward(&ge, &ae, &be, n, d).unwrap();
        assert_close(&format!("{what} dẐa"), &down(s, &da), &ra, tol(math));
        assert_close(&format!("{what} dẐb"), &down(s, &db), &rb, tol(math));
    }
}

#[test]
fn cublas_gemms_match_reference_in_every_mode() {
    let Some(s) = gpu("cublas_gemms_match_reference_in_every_mode") else {
        return;
    };
    let mut ops = CudaOps::new(&s).unwrap();
    check_gemms::<f32>(&s, &mut ops, Math::F32, 30);
    check_gemms::<f32>(&s, &mut ops, Math::Tf32, 31);
    check_gemms::<bf16>(&s, &mut ops, Math::Bf16, 32);
    // A mode and an element type that do not go together is an error, not a wrong GEMM.
    let x = up(&s, &[0f32; 4]);
    let mut c = poisoned::<f32>(&s, 4);
    let e = ops
        .cross_correlation(Math::Bf16, &x, &x, Dims::new(2, 2), &mut c)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
}

#[test]
fn fused_reduction_matches_reference() {
    let Some(s) = gpu("fused_reduction_matches_reference") else {
        return;
    };
    let mut ops = CudaOps::new(&s).unwrap();
    let mut rng = Rng::new(40);
    // D % 4 == 0 takes the vectorized path; the others the scalar one.
    for d in [1usize, 7, 129, 256, 1024, 4099] {
        let c: Vec<f32> = (0..d * d)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect();
        let c64 = to_f64(&c);
        let (on, off) = reference::loss_terms(&c64, d, LAMBDA).unwrap();
        let grad = reference::loss_grad(&c64, d, LAMBDA).unwrap();
        let what = format!("D={d}");

        let mut cd = up(&s, &c);
        ops.loss_reduce_in_place(Math::F32, &mut cd, d, LAMBDA as f32, false)
            .unwrap();
        let v0 = ops.read_loss().unwrap();
        assert_eq!(
            down(&s, &cd),
            c,
            "{what}: forward-only reduction must leave C alone"
        );

        ops.loss_reduce_in_place(Math::F32, &mut cd, d, LAMBDA as f32, true)
            .unwrap();
        let v = ops.read_loss().unwrap();
        assert_eq!(v, v0, "{what}: the gradient flag must not change the sums");
        assert_close_scalar(&format!("{what} on"), v.on_diag, on, 1e-5);
        if d > 1 {
            assert_close_scalar(&format!("{what} off"), v.off_diag, off, 1e-5);
        }
        assert_close(
            &format!("{what} dL/dC in place"),
            &down(&s, &cd),
            &grad,
            1e-6,
        );

        // TF32 mode: the same sums, dL/dC rounded to TF32.
        let mut ct = up(&s, &c);
        ops.loss_reduce_in_place(Math::Tf32, &mut ct, d, LAMBDA as f32, true)
            .unwrap();
        assert_eq!(
            ops.read_loss().unwrap(),
            v0,
            "{what}: TF32 flag changed the sums"
        );
        let gt = down(&s, &ct);
        assert!(
            gt.iter().all(|&x| round_tf32(x) == x),
            "{what}: dL/dC not TF32-rounded"
        );
        assert_close(&format!("{what} dL/dC tf32"), &gt, &grad, 1e-3);

        // A view that starts one float in is not 16-byte aligned: the scalar path must take it.
        let mut padded = vec![f32::NAN; d * d + 1];
        padded[1..].copy_from_slice(&c);
        let mut pd = up(&s, &padded);
        {
            let mut view = pd.slice_mut(1..);
            ops.loss_reduce_in_place(Math::F32, &mut view, d, LAMBDA as f32, true)
                .unwrap();
        }
        // The scalar path sums in another order than the float4 one: equal to rounding only.
        let vu = ops.read_loss().unwrap();
        assert_close_scalar(
            &format!("{what} unaligned on"),
            vu.on_diag,
            v0.on_diag,
            1e-6,
        );
        assert_close_scalar(&format!("{what} unaligned total"), vu.total, v0.total, 1e-6);
        let back = down(&s, &pd);
        assert!(back[0].is_nan(), "{what}: wrote before the view");
        assert_close(&format!("{what} dL/dC unaligned"), &back[1..], &grad, 1e-6);

        let cd = up(&s, &c);
        let mut g16 = poisoned::<bf16>(&s, d * d);
        ops.loss_reduce_bf16_grad(&cd, &mut g16, d, LAMBDA as f32)
            .unwrap();
        let v16 = ops.read_loss().unwrap();
        assert_eq!(
            v16, v0,
            "{what}: bf16-gradient variant must give the same sums"
        );
        assert_close(&format!("{what} dL/dC bf16"), &down(&s, &g16), &grad, 1e-2);
    }
}

/// The whole fused loss for inputs of type T under `math`, by both paths.
fn check_fused<T: Host>(s: &Arc<CudaStream>, math: Math, seed: u64) {
    for path in [LossPath::Direct, LossPath::Gram] {
        check_fused_path::<T>(s, math, path, seed);
    }
}

fn check_fused_path<T: Host>(s: &Arc<CudaStream>, math: Math, path: LossPath, seed: u64) {
    let loss = BarlowTwinsLoss::new(LossConfig::default().math(math).path(path)).unwrap();
    let mut rng = Rng::new(seed);
    for &(n, d) in SHAPES {
        let za = rng.matrix(n, d);
        let zb = rng.correlated(&za, 0.5);
        let (aq, a64) = quantize::<T>(&za);
        let (bq, b64) = quantize::<T>(&zb);
        let dims = Dims::new(n, d);
        let r = reference::forward_backward(&a64, &b64, dims, LAMBDA, EPS).unwrap();
        let (ad, bd) = (up(s, &aq), up(s, &bq));
        let mut dza = poisoned::<T>(s, n * d);
        let mut dzb = poisoned::<T>(s, n * d);
        let v = loss
            .forward_backward(s, &ad, &bd, dims, &mut dza, &mut dzb)
            .unwrap();
        let what = format!("fused {:?} {math:?} {path:?} N={n} D={d}", T::DTYPE);
        assert_eq!(v.path, path, "{what}: the value names another path");
        let t = tol(math).max(T::UNIT);
        assert_loss_close(&what, v, &r, LAMBDA, tol(math));
        let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
        let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
        assert_close_grad(&format!("{what} dza"), &down(s, &dza), &r.grad_za, sa, t);
        assert_close_grad(&format!("{what} dzb"), &down(s, &dzb), &r.grad_zb, sb, t);
        let f = loss.forward(s, &ad, &bd, dims).unwrap();
        assert_eq!(f, v, "{what}: forward and forward_backward disagree");
    }
}

#[test]
fn fused_loss_matches_reference_f32() {
    let Some(s) = gpu("fused_loss_matches_reference_f32") else {
        return;
    };
    check_fused::<f32>(&s, Math::F32, 50);
}

#[test]
fn fused_loss_matches_reference_tf32() {
    let Some(s) = gpu("fused_loss_matches_reference_tf32") else {
        return;
    };
    check_fused::<f32>(&s, Math::Tf32, 51);
}

#[test]
fn fused_loss_matches_reference_bf16_math() {
    let Some(s) = gpu("fused_loss_matches_reference_bf16_math") else {
        return;
    };
    check_fused::<f32>(&s, Math::Bf16, 52);
    check_fused::<bf16>(&s, Math::Bf16, 53);
}

#[test]
fn fused_loss_matches_reference_half_inputs() {
    let Some(s) = gpu("fused_loss_matches_reference_half_inputs") else {
        return;
    };
    check_fused::<bf16>(&s, Math::F32, 54);
    check_fused::<f16>(&s, Math::F32, 55);
}

#[test]
fn naive_path_matches_reference_and_fused() {
    let Some(s) = gpu("naive_path_matches_reference_and_fused") else {
        return;
    };
    let mut rng = Rng::new(60);
    for math in [Math::F32, Math::Tf32, Math::Bf16] {
        let config = LossConfig::default().math(math);
        let mut naive = NaiveLoss::new(&s, config).unwrap();
        let fused = BarlowTwinsLoss::new(config).unwrap();
        for &(n, d) in SHAPES {
            let za = rng.matrix(n, d);
            let zb = rng.correlated(&za, 0.5);
            let dims = Dims::new(n, d);
            let r =
                reference::forward_backward(&to_f64(&za), &to_f64(&zb), dims, LAMBDA, EPS).unwrap();
            let (ad, bd) = (up(&s, &za), up(&s, &zb));
            let mut dza = poisoned::<f32>(&s, n * d);
            let mut dzb = poisoned::<f32>(&s, n * d);
            let v = naive
                .forward_backward(&ad, &bd, dims, &mut dza, &mut dzb)
                .unwrap();
            let what = format!("naive {math:?} N={n} D={d}");
            // Like the reference PyTorch code, the naive path leaves the FP32→TF32 conversion to
            // the tensor cores, which may truncate rather than round: allow twice the TF32 error.
            let naive_tol = if math == Math::Tf32 {
                2.0 * tol(math)
            } else {
                tol(math)
            };
            assert_loss_close(&what, v, &r, LAMBDA, naive_tol);
            let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
            let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
            let (na, nb) = (down(&s, &dza), down(&s, &dzb));
            assert_close_grad(&format!("{what} dza"), &na, &r.grad_za, sa, naive_tol);
            assert_close_grad(&format!("{what} dzb"), &nb, &r.grad_zb, sb, naive_tol);

            let mut fa = poisoned::<f32>(&s, n * d);
            let mut fb = poisoned::<f32>(&s, n * d);
            let fv = fused
                .forward_backward(&s, &ad, &bd, dims, &mut fa, &mut fb)
                .unwrap();
            assert_loss_close(&format!("{what} vs fused"), fv, &r, LAMBDA, tol(math));
            let fa64 = to_f64(&down(&s, &fa));
            assert_close_grad(
                &format!("{what} fused vs naive dza"),
                &na,
                &fa64,
                sa,
                2.0 * naive_tol,
            );
        }
    }
}

#[test]
fn fused_loss_is_deterministic() {
    let Some(s) = gpu("fused_loss_is_deterministic") else {
        return;
    };
    let mut rng = Rng::new(70);
    for (math, path) in [Math::F32, Math::Tf32, Math::Bf16]
        .into_iter()
        .flat_map(|m| [(m, LossPath::Direct), (m, LossPath::Gram)])
    {
        let loss = BarlowTwinsLoss::new(LossConfig::default().math(math).path(path)).unwrap();
        let (n, d) = (257, 1031);
        let za = rng.matrix(n, d);
        let zb = rng.correlated(&za, 0.4);
        let (ad, bd) = (up(&s, &za), up(&s, &zb));
        let run = || {
            let mut a = poisoned::<f32>(&s, n * d);
            let mut b = poisoned::<f32>(&s, n * d);
            let v = loss
                .forward_backward(&s, &ad, &bd, Dims::new(n, d), &mut a, &mut b)
                .unwrap();
            let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            (
                v.total.to_bits(),
                v.on_diag.to_bits(),
                bits(down(&s, &a)),
                bits(down(&s, &b)),
            )
        };
        let first = run();
        for _ in 0..3 {
            assert!(run() == first, "{math:?}: two runs differ");
        }
    }
}

#[test]
fn workspace_is_reused_across_shapes() {
    let Some(s) = gpu("workspace_is_reused_across_shapes") else {
        return;
    };
    for path in [LossPath::Direct, LossPath::Gram] {
        workspace_reuse(&s, path);
    }
}

fn workspace_reuse(s: &Arc<CudaStream>, path: LossPath) {
    let s = s.clone();
    let loss = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
    let mut rng = Rng::new(80);
    // Large, then smaller (fits the workspace), then larger again (reallocates).
    for &(n, d) in &[(300, 500), (37, 129), (301, 777)] {
        let za = rng.matrix(n, d);
        let zb = rng.correlated(&za, 0.5);
        let dims = Dims::new(n, d);
        let r = reference::forward_backward(&to_f64(&za), &to_f64(&zb), dims, LAMBDA, EPS).unwrap();
        let (ad, bd) = (up(&s, &za), up(&s, &zb));
        let mut a = poisoned::<f32>(&s, n * d);
        let mut b = poisoned::<f32>(&s, n * d);
        let v = loss
            .forward_backward(&s, &ad, &bd, dims, &mut a, &mut b)
            .unwrap();
        assert_loss_close(&format!("N={n} D={d}"), v, &r, LAMBDA, 1e-5);
        let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
        assert_close_grad(
            &format!("N={n} D={d} dza"),
            &down(&s, &a),
            &r.grad_za,
            sa,
            1e-5,
        );
    }
}

#[test]
fn gpu_errors_are_typed() {
    let Some(s) = gpu("gpu_errors_are_typed") else {
        return;
    };
    let loss = BarlowTwinsLoss::new(LossConfig::default()).unwrap();
    let (n, d) = (4, 3);
    let z = up(
        &s,
        &[
            0.25f32, -1.0, 2.0, 0.5, 1.5, -0.75, 3.0, 0.1, -2.0, 1.0, 0.3, 0.7,
        ],
    );
    let short = up(&s, &[1f32; 11]);
    let mut g = poisoned::<f32>(&s, n * d);
    let mut g_short = poisoned::<f32>(&s, n * d - 1);

    let e = loss.forward(&s, &z, &short, Dims::new(n, d)).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { name: "zb", .. }), "{e}");
    let e = loss.forward(&s, &z, &z, Dims::new(1, 12)).unwrap_err();
    assert!(matches!(e, Error::BatchTooSmall { n: 1 }), "{e}");
    let e = loss.forward(&s, &z, &z, Dims::new(12, 0)).unwrap_err();
    assert!(matches!(e, Error::EmptyFeatures), "{e}");
    let e = loss
        .forward_backward(&s, &z, &z, Dims::new(n, d), &mut g, &mut g_short)
        .unwrap_err();
    assert!(
        matches!(e, Error::BufferTooSmall { name: "dzb", .. }),
        "{e}"
    );

    let mut nan = s.clone_dtoh(&z).unwrap();
    nan[4] = f32::NAN;
    let nan = up(&s, &nan);
    let e = loss.forward(&s, &nan, &z, Dims::new(n, d)).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");

    // The direct path's D×D and the Gram path's N×N (4.4 TB each) fit on no GPU: typed
    // out-of-memory errors, and the loss still works after.
    let big = 1 << 20;
    let long = up(&s, &vec![0.5f32; 2 * big]);
    for (path, dims) in [
        (LossPath::Direct, Dims::new(2, big)),
        (LossPath::Gram, Dims::new(big, 2)),
    ] {
        let forced = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
        let e = forced.forward(&s, &long, &long, dims).unwrap_err();
        assert!(
            matches!(e, Error::OutOfDeviceMemory { .. }),
            "{path:?}: {e}"
        );
        forced.forward(&s, &z, &z, Dims::new(n, d)).unwrap();
    }
    loss.forward(&s, &z, &z, Dims::new(n, d)).unwrap();

    let mut ops = CudaOps::new(&s).unwrap();
    let mut c = poisoned::<f32>(&s, 4);
    let e = ops
        .loss_reduce_in_place(Math::F32, &mut c, 3_000_000_000, 0.005, true)
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");

    // A buffer from another context on the same device. Creating that context makes it current
    // on this thread; it is dropped (and the primary context made current) before anything else.
    {
        let other = CudaContext::new_non_primary(0, 0).unwrap();
        let foreign = other.default_stream().clone_htod(&[1f32; 12]).unwrap();
        let e = loss.forward(&s, &z, &foreign, Dims::new(n, d)).unwrap_err();
        assert!(matches!(e, Error::WrongContext { name: "zb" }), "{e}");
    }
    s.context().bind_to_thread().unwrap();
    loss.forward(&s, &z, &z, Dims::new(n, d)).unwrap();
}

/// Near convergence (C ≈ I) the Gram path's off-diagonal sum is a small difference of large sums:
/// both paths within 1e-4 of the f64 reference in f32 mode; the errors are printed for TF32 and
/// bf16.
#[test]
fn gram_path_holds_accuracy_near_convergence() {
    let Some(s) = gpu("gram_path_holds_accuracy_near_convergence") else {
        return;
    };
    let mut rng = Rng::new(90);
    for &(n, d, noise) in &[
        (256usize, 1024usize, 0.01f64),
        (1024, 512, 0.02),
        (128, 4096, 0.001),
        (4096, 256, 0.01),
    ] {
        let za = rng.matrix(n, d);
        let zb: Vec<f32> = za
            .iter()
            .map(|&x| (f64::from(x) + noise * rng.normal()) as f32)
            .collect();
        let dims = Dims::new(n, d);
        let r = reference::forward_backward(&to_f64(&za), &to_f64(&zb), dims, LAMBDA, EPS).unwrap();
        let (ad, bd) = (up(&s, &za), up(&s, &zb));
        for math in [Math::F32, Math::Tf32, Math::Bf16] {
            for path in [LossPath::Direct, LossPath::Gram] {
                let loss =
                    BarlowTwinsLoss::new(LossConfig::default().math(math).path(path)).unwrap();
                let mut a = poisoned::<f32>(&s, n * d);
                let mut b = poisoned::<f32>(&s, n * d);
                let v = loss
                    .forward_backward(&s, &ad, &bd, dims, &mut a, &mut b)
                    .unwrap();
                let el = rel_err_scalar(v.total, r.total);
                let eg = rel_err(&down(&s, &a), &r.grad_za).max(rel_err(&down(&s, &b), &r.grad_zb));
                println!("{math:?} {path:?} N={n} D={d} noise={noise}: loss {:.4} error {el:.2e}, gradients {eg:.2e}", r.total);
                if math == Math::F32 {
                    assert!(
                        el <= 1e-4 && eg <= 1e-4,
                        "{path:?} N={n} D={d}: {el:.2e} {eg:.2e}"
                    );
                }
            }
        }
    }
}

#[test]
fn on_device_loss_matches_the_waiting_call_and_flags_non_finite_inputs() {
    let Some(s) = gpu("on_device_loss_matches_the_waiting_call_and_flags_non_finite_inputs") else {
        return;
    };
    let mut rng = Rng::new(80);
    for path in [LossPath::Direct, LossPath::Gram] {
        let loss = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
        let (n, d) = (37, 21);
        let dims = Dims::new(n, d);
        let za = rng.matrix(n, d);
        let zb = rng.correlated(&za, 0.5);
        let a64 = to_f64(&za);
        let b64 = to_f64(&zb);
        let r = reference::forward_backward(&a64, &b64, dims, LAMBDA, EPS).unwrap();
        let (ad, bd) = (up(&s, &za), up(&s, &zb));
        let what = format!("on-device {path:?}");

        // Every slot, and the gradients, without a wait in the call.
        let mut out = poisoned::<f32>(&s, barlow::cuda::DEVICE_LOSS_SLOTS);
        let mut dza = poisoned::<f32>(&s, n * d);
        let mut dzb = poisoned::<f32>(&s, n * d);
        loss.forward_backward_on_device(&s, &ad, &bd, dims, &mut dza, &mut dzb, &mut out)
            .unwrap();
        let got = down(&s, &out);
        assert_close_scalar(&format!("{what} total"), f64::from(got[0]), r.total, 1e-5);
        assert_close_scalar(&format!("{what} on"), f64::from(got[1]), r.on_diag, 1e-5);
        assert_close_scalar(&format!("{what} off"), f64::from(got[2]), r.off_diag, 1e-5);
        assert_eq!(got[3], 0.0, "{what}: finite inputs flagged");
        let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
        let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
        assert_close_grad(
            &format!("{what} dza"),
            &down(&s, &dza),
            &r.grad_za,
            sa,
            1e-5,
        );
        assert_close_grad(
            &format!("{what} dzb"),
            &down(&s, &dzb),
            &r.grad_zb,
            sb,
            1e-5,
        );
        // The waiting call gives the same numbers (it reads the same f64 sums).
        let v = loss.forward(&s, &ad, &bd, dims).unwrap();
        assert_eq!(got[0], v.total as f32, "{what}: differs from forward");

        // A one-element output is a device scalar; the slot after it is left alone.
        let mut scalar = poisoned::<f32>(&s, 2);
        let mut view = scalar.slice_mut(..1);
        loss.forward_on_device(&s, &ad, &bd, dims, &mut view)
            .unwrap();
        let got = down(&s, &scalar);
        assert_eq!(got[0], v.total as f32, "{what}: scalar output");
        assert!(got[1].is_nan(), "{what}: wrote past a one-element output");

        // Non-finite inputs: no error from the call, the flag set on the device.
        let mut bad = za.clone();
        bad[5] = f32::NAN;
        let bad = up(&s, &bad);
        let mut out = poisoned::<f32>(&s, barlow::cuda::DEVICE_LOSS_SLOTS);
        loss.forward_on_device(&s, &bad, &bd, dims, &mut out)
            .unwrap();
        let got = down(&s, &out);
        assert_eq!(got[3], 1.0, "{what}: NaN input not flagged");
        assert!(!got[0].is_finite(), "{what}: NaN input gave a finite loss");

        // Bad outputs are typed errors before anything is queued.
        let mut empty = s.alloc_zeros::<f32>(1).unwrap();
        let mut none = empty.slice_mut(..0);
        assert!(matches!(
            loss.forward_on_device(&s, &ad, &bd, dims, &mut none),
            Err(Error::BufferTooSmall { .. })
        ));
    }
}

/// The non-blocking call captured into a CUDA graph: capture queues nothing that runs, nothing in
/// it waits on the host or allocates, and each launch of the graph computes the loss and gradients
/// of whatever the input buffers then hold. On the virtual device the capture rules are checked
/// call by call (a synchronize, an allocation or a wait on an outside event during the capture is
/// reported).
#[test]
fn on_device_loss_is_capturable_in_a_cuda_graph() {
    use barlow::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some(null) = gpu("on_device_loss_is_capturable_in_a_cuda_graph") else {
        return;
    };
    // cudarc's event tracking would make the capture wait on events recorded before it (invalid
    // in a capture); one stream needs none.
    // SAFETY: every buffer below is used on this one stream only.
    unsafe { null.context().disable_event_tracking() };
    // The legacy null stream cannot be captured.
    let s = null.context().new_stream().unwrap();
    let mut rng = Rng::new(81);
    for path in [LossPath::Direct, LossPath::Gram] {
        let loss = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
        let (n, d) = (29, 18);
        let dims = Dims::new(n, d);
        let what = format!("graph {path:?}");
        let mut ad = poisoned::<f32>(&s, n * d);
        let mut bd = poisoned::<f32>(&s, n * d);
        let mut dza = poisoned::<f32>(&s, n * d);
        let mut dzb = poisoned::<f32>(&s, n * d);
        let mut out = poisoned::<f32>(&s, barlow::cuda::DEVICE_LOSS_SLOTS);
        // A first call outside the capture sizes the workspace.
        let za = rng.matrix(n, d);
        s.memcpy_htod(&za, &mut ad).unwrap();
        s.memcpy_htod(&rng.correlated(&za, 0.4), &mut bd).unwrap();
        loss.forward_backward_on_device(&s, &ad, &bd, dims, &mut dza, &mut dzb, &mut out)
            .unwrap();
        s.synchronize().unwrap();
        let nan = vec![f32::NAN; n * d];
        s.memcpy_htod(&nan, &mut dza).unwrap();
        s.memcpy_htod(&nan[..barlow::cuda::DEVICE_LOSS_SLOTS], &mut out)
            .unwrap();
        s.synchronize().unwrap();

        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
            .unwrap();
        let queued =
            loss.forward_backward_on_device(&s, &ad, &bd, dims, &mut dza, &mut dzb, &mut out);
        let graph = s.end_capture(CUgraphInstantiate_flags(0));
        queued.unwrap();
        let graph = graph.unwrap().expect("an empty capture");
        assert!(
            down(&s, &out).iter().all(|v| v.is_nan()),
            "{what}: the captured work ran at capture"
        );

        for round in 0..2 {
            let za = rng.matrix(n, d);
            let zb = rng.correlated(&za, 0.3 + 0.3 * round as f64);
            s.memcpy_htod(&za, &mut ad).unwrap();
            s.memcpy_htod(&zb, &mut bd).unwrap();
            s.memcpy_htod(&nan, &mut dza).unwrap();
            s.memcpy_htod(&nan, &mut dzb).unwrap();
            graph.launch().unwrap();
            let r =
                reference::forward_backward(&to_f64(&za), &to_f64(&zb), dims, LAMBDA, EPS).unwrap();
            let got = down(&s, &out);
            let w = format!("{what} launch {round}");
            assert_close_scalar(&format!("{w} total"), f64::from(got[0]), r.total, 1e-5);
            assert_close_scalar(&format!("{w} on"), f64::from(got[1]), r.on_diag, 1e-5);
            assert_close_scalar(&format!("{w} off"), f64::from(got[2]), r.off_diag, 1e-5);
            assert_eq!(got[3], 0.0, "{w}: finite inputs flagged");
            let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
            let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
            assert_close_grad(&format!("{w} dza"), &down(&s, &dza), &r.grad_za, sa, 1e-5);
            assert_close_grad(&format!("{w} dzb"), &down(&s, &dzb), &r.grad_zb, sb, 1e-5);
        }

        // A larger shape needs a larger workspace: refused while capturing (growing allocates
        // and frees), with the capture left intact; outside a capture it grows.
        let (n2, d2) = (2 * n + 3, d + 7);
        let big = Dims::new(n2, d2);
        let za = rng.matrix(n2, d2);
        let zb = rng.correlated(&za, 0.5);
        let (a2, b2) = (up(&s, &za), up(&s, &zb));
        let (mut ga, mut gb) = (poisoned::<f32>(&s, n2 * d2), poisoned::<f32>(&s, n2 * d2));
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
            .unwrap();
        let refused =
            loss.forward_backward_on_device(&s, &a2, &b2, big, &mut ga, &mut gb, &mut out);
        let ended = s.end_capture(CUgraphInstantiate_flags(0));
        match refused {
            Err(Error::InvalidConfig(m)) => assert!(m.contains("capturing"), "{what}: {m}"),
            other => panic!("{what}: growing during a capture gave {other:?}"),
        }
        assert!(ended.is_ok(), "{what}: the refused call broke the capture");
        let v = loss
            .forward_backward(&s, &a2, &b2, big, &mut ga, &mut gb)
            .unwrap();
        let r = reference::forward_backward(&to_f64(&za), &to_f64(&zb), big, LAMBDA, EPS).unwrap();
        assert_loss_close(&format!("{what} grown"), v, &r, LAMBDA, 1e-5);
    }
}
