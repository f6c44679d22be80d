//! The CPU path against the float64 reference, the reference against finite differences, and the
//! loss's invariances.

mod common;

use barlow::cpu::{self, reference};
use barlow::{BarlowTwinsLoss, Dims, LossConfig, LossPath};
use common::*;

const LAMBDA: f64 = 0.0051;
const EPS: f64 = 1e-5;
const F32_TOL: f64 = 1e-5;

fn loss() -> BarlowTwinsLoss {
    BarlowTwinsLoss::new(LossConfig::default()).unwrap()
}

#[test]
fn reference_gradient_matches_finite_differences() {
    let mut rng = Rng::new(1);
    for &(n, d) in &[(2, 1), (3, 2), (5, 3), (6, 4)] {
        let za: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let zb: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let dims = Dims::new(n, d);
        // A larger λ so the off-diagonal term weighs in the check.
        let lambda = 0.3;
        let r = reference::forward_backward(&za, &zb, dims, lambda, EPS).unwrap();
        let h = 1e-6;
        for (which, analytic) in [(0, &r.grad_za), (1, &r.grad_zb)] {
            for k in 0..n * d {
                let f = |delta: f64| {
                    let (mut a, mut b) = (za.clone(), zb.clone());
                    if which == 0 {
                        a[k] += delta;
                    } else {
                        b[k] += delta;
                    }
                    reference::loss(&a, &b, dims, lambda, EPS).unwrap()
                };
                let numeric = (f(h) - f(-h)) / (2.0 * h);
                let err = (numeric - analytic[k]).abs() / analytic[k].abs().max(1e-3);
                assert!(
                    err < 1e-5,
                    "N={n} D={d} view {which} element {k}: analytic {} vs numeric {numeric}",
                    analytic[k]
                );
            }
        }
    }
}

#[test]
fn reference_on_known_input() {
    // Za = Zb = one column [-1, 1]: Ẑ = [-1, 1]/sqrt(1 + eps), C = 1/(1 + eps), no off-diagonal.
    let z = [-1.0, 1.0];
    let r = reference::forward_backward(&z, &z, Dims::new(2, 1), LAMBDA, EPS).unwrap();
    let c = 1.0 / (1.0 + EPS);
    assert!((r.c[0] - c).abs() < 1e-15);
    assert!((r.total - (1.0 - c).powi(2)).abs() < 1e-15);
    assert_eq!(r.off_diag, 0.0);
}

/// The fast CPU path, direct and Gram, against the reference on every shape the issue names.
#[test]
fn cpu_forward_backward_matches_reference() {
    for path in [LossPath::Direct, LossPath::Gram] {
        cpu_matches_reference(path);
    }
}

fn cpu_matches_reference(path: LossPath) {
    let mut rng = Rng::new(2);
    let l = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
    for &n in &[2usize, 3, 17, 256] {
        for &d in &[1usize, 2, 7, 129, 1024] {
            let za = rng.matrix(n, d);
            let zb = rng.correlated(&za, 0.5);
            let dims = Dims::new(n, d);
            let mut dza = vec![f32::NAN; n * d];
            let mut dzb = vec![f32::NAN; n * d];
            let v = l
                .forward_backward_cpu(&za, &zb, dims, &mut dza, &mut dzb)
                .unwrap();
            let r =
                reference::forward_backward(&to_f64(&za), &to_f64(&zb), dims, LAMBDA, EPS).unwrap();
            let what = format!("{path:?} N={n} D={d}");
            assert_eq!(v.path, path);
            assert_loss_close(&what, v, &r, LAMBDA, F32_TOL);
            let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
            let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
            assert_close_grad(&format!("{what} dza"), &dza, &r.grad_za, sa, F32_TOL);
            assert_close_grad(&format!("{what} dzb"), &dzb, &r.grad_zb, sb, F32_TOL);
            let f = l.forward_cpu(&za, &zb, dims).unwrap();
            assert_eq!(f, v, "{what}: forward and forward_backward disagree");
        }
    }
}

/// Each CPU kernel twin on its own, outputs poisoned with NaN first.
#[test]
fn cpu_kernels_match_reference() {
    let mut rng = Rng::new(3);
    for &(n, d) in &[(3usize, 5usize), (33, 7), (65, 130)] {
        let dims = Dims::new(n, d);
        let z = rng.matrix(n, d);
        let z64 = to_f64(&z);
        let rs = reference::standardize(&z64, n, d, EPS).unwrap();
        let (mut zhat, mut stats) = (vec![f32::NAN; n * d], vec![f32::NAN; 3 * d]);
        cpu::standardize_forward(&z, dims, EPS as f32, &mut zhat, &mut stats).unwrap();
        assert_close("zhat", &zhat, &rs.zhat, F32_TOL);
        let mean: Vec<f64> = (0..d)
            .map(|j| f64::from(stats[j]) + f64::from(stats[d + j]))
            .collect();
        assert!(mean
            .iter()
            .zip(&rs.mean)
            .all(|(a, b)| (a - b).abs() <= 1e-7 * b.abs().max(1.0)));
        assert_close("rstd", &stats[2 * d..], &rs.rstd, F32_TOL);

        let a = rng.matrix(n, d);
        let b = rng.matrix(n, d);
        let mut c = vec![f32::NAN; d * d];
        cpu::cross_correlation(&a, &b, dims, &mut c).unwrap();
        let c64 = reference::cross_correlation(&to_f64(&a), &to_f64(&b), n, d).unwrap();
        assert_close("C", &c, &c64, F32_TOL);

        let mut cm: Vec<f32> = (0..d * d)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect();
        let cm64 = to_f64(&cm);
        let v = cpu::loss_reduce(&mut cm, d, LAMBDA as f32, true).unwrap();
        let (on, off) = reference::loss_terms(&cm64, d, LAMBDA).unwrap();
        assert_close_scalar("on", v.on_diag, on, F32_TOL);
        assert_close_scalar("off", v.off_diag, off, F32_TOL);
        assert_close(
            "dL/dC",
            &cm,
            &reference::loss_grad(&cm64, d, LAMBDA).unwrap(),
            F32_TOL,
        );

        let g: Vec<f32> = (0..d * d).map(|_| rng.normal() as f32).collect();
        let (mut da, mut db) = (vec![f32::NAN; n * d], vec![f32::NAN; n * d]);
        cpu::correlation_backward(&g, &a, &b, dims, &mut da, &mut db).unwrap();
        let (ra, rb) =
            reference::correlation_backward(&to_f64(&g), &to_f64(&a), &to_f64(&b), n, d).unwrap();
        assert_close("dẐa", &da, &ra, F32_TOL);
        assert_close("dẐb", &db, &rb, F32_TOL);

        let gz: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let mut dz = vec![f32::NAN; n * d];
        cpu::standardize_backward(&gz, &z, &stats, dims, &mut dz).unwrap();
        let rdz = reference::standardize_backward(&to_f64(&gz), &rs, n, d).unwrap();
        assert_close("dZ", &dz, &rdz, F32_TOL);
    }
}

#[test]
fn standardization_is_exact_when_mean_dwarfs_std() {
    // |μ| = 1e4 ≫ σ ≈ 1: a sum-of-squares variance would cancel catastrophically in f32.
    let mut rng = Rng::new(4);
    let (n, d) = (300, 9);
    let z: Vec<f32> = (0..n * d).map(|_| (1e4 + rng.normal()) as f32).collect();
    let r = reference::standardize(&to_f64(&z), n, d, EPS).unwrap();
    let (mut zhat, mut stats) = (vec![0f32; n * d], vec![0f32; 3 * d]);
    cpu::standardize_forward(&z, Dims::new(n, d), EPS as f32, &mut zhat, &mut stats).unwrap();
    assert_close("zhat", &zhat, &r.zhat, F32_TOL);
    assert_close("rstd", &stats[2 * d..], &r.rstd, F32_TOL);
}

#[test]
fn loss_is_invariant_to_column_shift_and_scale() {
    let mut rng = Rng::new(5);
    let (n, d) = (64, 16);
    let za = rng.matrix(n, d);
    let zb = rng.correlated(&za, 0.3);
    let l = loss();
    let base = l.forward_cpu(&za, &zb, Dims::new(n, d)).unwrap().total;
    for col in [0, 7, 15] {
        let mut moved = za.clone();
        for i in 0..n {
            moved[i * d + col] = moved[i * d + col] * 3.0 - 5.0;
        }
        let v = l.forward_cpu(&moved, &zb, Dims::new(n, d)).unwrap().total;
        // Only eps, relative to the column variance, tells the two apart.
        assert!(
            (v - base).abs() / base < 1e-4,
            "column {col}: {v} vs {base}"
        );
    }
}

#[test]
fn swapping_views_transposes_c_and_keeps_the_loss() {
    let mut rng = Rng::new(6);
    let (n, d) = (40, 12);
    let za = rng.matrix(n, d);
    let zb = rng.correlated(&za, 0.7);
    let dims = Dims::new(n, d);
    let ab = reference::forward_backward(&to_f64(&za), &to_f64(&zb), dims, LAMBDA, EPS).unwrap();
    let ba = reference::forward_backward(&to_f64(&zb), &to_f64(&za), dims, LAMBDA, EPS).unwrap();
    for i in 0..d {
        for j in 0..d {
            assert!((ab.c[i * d + j] - ba.c[j * d + i]).abs() < 1e-12);
        }
    }
    let l = loss();
    let (mut g1a, mut g1b) = (vec![0f32; n * d], vec![0f32; n * d]);
    let (mut g2a, mut g2b) = (vec![0f32; n * d], vec![0f32; n * d]);
    let v1 = l
        .forward_backward_cpu(&za, &zb, dims, &mut g1a, &mut g1b)
        .unwrap();
    let v2 = l
        .forward_backward_cpu(&zb, &za, dims, &mut g2b, &mut g2a)
        .unwrap();
    assert_close_scalar("swapped loss", v2.total, v1.total, 1e-6);
    assert_close("swapped dza", &g2a, &to_f64(&g1a), 1e-5);
    assert_close("swapped dzb", &g2b, &to_f64(&g1b), 1e-5);
}

#[test]
fn cpu_path_is_deterministic() {
    let mut rng = Rng::new(7);
    let (n, d) = (128, 300);
    let za = rng.matrix(n, d);
    let zb = rng.correlated(&za, 0.2);
    let l = loss();
    let run = || {
        let (mut a, mut b) = (vec![0f32; n * d], vec![0f32; n * d]);
        let v = l
            .forward_backward_cpu(&za, &zb, Dims::new(n, d), &mut a, &mut b)
            .unwrap();
        (
            v.total.to_bits(),
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b,
        )
    };
    let (t1, a1, b1) = run();
    let (t2, a2, b2) = run();
    assert_eq!(t1, t2);
    assert_eq!(a1, a2);
    assert!(b1.iter().zip(&b2).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn gradient_buffers_longer_than_needed_keep_their_tail() {
    let mut rng = Rng::new(8);
    let (n, d) = (5, 3);
    let za = rng.matrix(n, d);
    let zb = rng.matrix(n, d);
    let (mut a, mut b) = (vec![-7.0f32; n * d + 4], vec![-7.0f32; n * d + 4]);
    loss()
        .forward_backward_cpu(&za, &zb, Dims::new(n, d), &mut a, &mut b)
        .unwrap();
    assert!(a[n * d..].iter().chain(&b[n * d..]).all(|&x| x == -7.0));
    assert!(a[..n * d].iter().all(|&x| x != -7.0 && x.is_finite()));
}

#[test]
fn auto_path_picks_the_cheaper_computation() {
    assert_eq!(LossPath::Auto.resolve(Dims::new(256, 8192)), LossPath::Gram);
    assert_eq!(
        LossPath::Auto.resolve(Dims::new(2048, 8192)),
        LossPath::Gram
    );
    assert_eq!(
        LossPath::Auto.resolve(Dims::new(4096, 1024)),
        LossPath::Direct
    );
    assert_eq!(
        LossPath::Auto.resolve(Dims::new(256, 256)),
        LossPath::Direct
    );
    // C would need 2³² elements: Gram whatever the batch.
    assert_eq!(
        LossPath::Auto.resolve(Dims::new(100_000, 65_536)),
        LossPath::Gram
    );
    assert_eq!(
        LossPath::Direct.resolve(Dims::new(2, 1 << 20)),
        LossPath::Direct
    );
    let l = loss();
    let mut rng = Rng::new(9);
    let za = rng.matrix(16, 64);
    let v = l
        .forward_cpu(&za, &rng.correlated(&za, 0.5), Dims::new(16, 64))
        .unwrap();
    assert_eq!(
        v.path,
        LossPath::Gram,
        "the value says which path computed it"
    );
}

/// Near convergence (Zb ≈ Za, C ≈ I) the Gram path's off-diagonal sum is a small difference of
/// two sums near D. Both paths must stay within 1e-4 of the f64 reference on the loss and the
/// gradients; the measured errors are printed.
#[test]
fn gram_and_direct_paths_hold_accuracy_near_convergence() {
    let mut rng = Rng::new(10);
    for &(n, d, noise) in &[
        (256usize, 512usize, 0.05f64),
        (128, 1024, 0.01),
        (512, 256, 0.02),
        (64, 2048, 0.001),
        (2048, 128, 0.01),
    ] {
        let za = rng.matrix(n, d);
        let zb: Vec<f32> = za
            .iter()
            .map(|&x| (f64::from(x) + noise * rng.normal()) as f32)
            .collect();
        let dims = Dims::new(n, d);
        let r = reference::forward_backward(&to_f64(&za), &to_f64(&zb), dims, LAMBDA, EPS).unwrap();
        for path in [LossPath::Direct, LossPath::Gram] {
            let l = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
            let (mut a, mut b) = (vec![f32::NAN; n * d], vec![f32::NAN; n * d]);
            let v = l
                .forward_backward_cpu(&za, &zb, dims, &mut a, &mut b)
                .unwrap();
            let e_loss = rel_err_scalar(v.total, r.total);
            let e_grad = rel_err(&a, &r.grad_za).max(rel_err(&b, &r.grad_zb));
            println!("{path:?} N={n} D={d} noise={noise}: loss {:.4} rel err {e_loss:.2e}, grad rel err {e_grad:.2e}", r.total);
            assert!(
                e_loss <= 1e-4,
                "{path:?} N={n} D={d}: loss error {e_loss:.2e}"
            );
            assert!(
                e_grad <= 1e-4,
                "{path:?} N={n} D={d}: gradient error {e_grad:.2e}"
            );
        }
    }
}
