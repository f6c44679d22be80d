//! Every error a caller can cause on the CPU path, and the CUDA errors this machine can produce.

mod common;

use barlow::{BarlowTwinsLoss, Dims, Error, LossConfig};

fn loss() -> BarlowTwinsLoss {
    BarlowTwinsLoss::new(LossConfig::default()).unwrap()
}

#[test]
fn shape_mismatch_names_the_input() {
    let za = vec![0.5f32; 12];
    let zb = vec![0.5f32; 11];
    let e = loss().forward_cpu(&za, &zb, Dims::new(4, 3)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                name: "zb",
                len: 11,
                expected: 12,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("zb"));
}

#[test]
fn batch_of_one_is_rejected() {
    let z = vec![0.5f32; 3];
    let e = loss().forward_cpu(&z, &z, Dims::new(1, 3)).unwrap_err();
    assert!(matches!(e, Error::BatchTooSmall { n: 1 }), "{e}");
}

#[test]
fn zero_features_is_rejected() {
    let e = loss().forward_cpu(&[], &[], Dims::new(4, 0)).unwrap_err();
    assert!(matches!(e, Error::EmptyFeatures), "{e}");
}

#[test]
fn small_gradient_buffer_is_rejected_before_any_work() {
    let z: Vec<f32> = (0..12).map(|i| i as f32 * 0.3).collect();
    let mut dza = vec![f32::NAN; 12];
    let mut dzb = vec![f32::NAN; 10];
    let e = loss()
        .forward_backward_cpu(&z, &z, Dims::new(4, 3), &mut dza, &mut dzb)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BufferTooSmall {
                name: "dzb",
                len: 10,
                needed: 12
            }
        ),
        "{e}"
    );
    assert!(
        dza.iter().all(|x| x.is_nan()),
        "nothing may be written on error"
    );
}

#[test]
fn oversized_shapes_are_rejected_not_overflowed() {
    let e = loss()
        .forward_cpu(&[], &[], Dims::new(usize::MAX / 2, 3))
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let e = loss()
        .forward_cpu(&[], &[], Dims::new(2, usize::MAX / 4))
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

#[test]
fn bad_config_is_rejected() {
    for (lambda, eps) in [
        (f32::NAN, 1e-5),
        (-1.0, 1e-5),
        (0.005, 0.0),
        (0.005, f32::INFINITY),
    ] {
        let e = BarlowTwinsLoss::new(LossConfig::default().lambda(lambda).eps(eps));
        assert!(
            matches!(e, Err(Error::InvalidConfig(_))),
            "lambda {lambda} eps {eps}"
        );
    }
}

#[test]
fn non_finite_input_is_an_error_not_a_nan_loss() {
    let mut za: Vec<f32> = (0..12).map(|i| (i as f32).sin()).collect();
    let zb: Vec<f32> = (0..12).map(|i| (i as f32).cos()).collect();
    for bad in [f32::NAN, f32::INFINITY] {
        za[5] = bad;
        let e = loss().forward_cpu(&za, &zb, Dims::new(4, 3)).unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "{bad}: {e}");
    }
}

#[test]
#[cfg(feature = "cuda")]
fn cuda_entry_points_say_what_is_missing() {
    // On a machine without a GPU the exact reason depends on the build; with a GPU, nothing is.
    match barlow::cuda::check_available() {
        Ok(()) => println!("CUDA available: nothing missing to report"),
        Err(e) if !barlow::built_with_kernels() => assert!(matches!(e, Error::NoKernels), "{e}"),
        Err(e) => assert!(
            matches!(e, Error::NoCudaDriver | Error::NoDevice(_)),
            "unexpected error: {e}"
        ),
    }
    if !barlow::built_with_kernels() {
        let e = barlow::cuda::check_available().unwrap_err();
        assert!(e.to_string().contains("built without CUDA kernels"));
    }
    match barlow::cuda::open_stream(0) {
        Ok(_) => {}
        Err(e) => assert!(
            matches!(e, Error::NoCudaDriver | Error::NoDevice(_)),
            "unexpected error: {e}"
        ),
    }
}

#[test]
fn public_building_blocks_reject_slices_of_the_wrong_length() {
    use barlow::cpu::{gram, reference};
    let dims = Dims::new(3, 4);
    let mut rng = barlow::rng::Rng::new(4);
    let a = rng.matrix(3, 4);
    let b = rng.matrix(3, 4);
    let short = &a[..11];
    fn shape<T>(r: Result<T, Error>) -> bool {
        matches!(r, Err(Error::ShapeMismatch { .. }))
    }
    assert!(shape(gram::diagonal(short, &b, dims)));
    assert!(shape(gram::diagonal(&a, &b[..11], dims)));
    assert!(shape(gram::gram(short, dims, &mut [0.0; 9])));
    assert!(matches!(
        gram::gram(&a, dims, &mut [0.0; 8]),
        Err(Error::BufferTooSmall { .. })
    ));
    let (a64, b64): (Vec<f64>, Vec<f64>) = (
        a.iter().map(|&v| f64::from(v)).collect(),
        b.iter().map(|&v| f64::from(v)).collect(),
    );
    assert!(shape(reference::standardize(&a64[..11], 3, 4, 1e-5)));
    assert!(matches!(
        reference::standardize(&a64[..4], 1, 4, 1e-5),
        Err(Error::BatchTooSmall { n: 1 })
    ));
    assert!(shape(reference::cross_correlation(&a64, &b64[..11], 3, 4)));
    assert!(shape(reference::loss_terms(&[0.0; 15], 4, 0.005)));
    assert!(shape(reference::loss_grad(&[0.0; 15], 4, 0.005)));
    assert!(shape(reference::correlation_backward(
        &[0.0; 15], &a64, &b64, 3, 4
    )));
    let s = reference::standardize(&a64, 3, 4, 1e-5).unwrap();
    assert!(shape(reference::standardize_backward(&a64[..11], &s, 3, 4)));

    // With the right lengths the diagonal is C's, to f64 rounding.
    let (sa, sb) = (
        reference::standardize(&a64, 3, 4, 1e-5).unwrap(),
        reference::standardize(&b64, 3, 4, 1e-5).unwrap(),
    );
    let c = reference::cross_correlation(&sa.zhat, &sb.zhat, 3, 4).unwrap();
    let (ha, hb): (Vec<f32>, Vec<f32>) = (
        sa.zhat.iter().map(|&v| v as f32).collect(),
        sb.zhat.iter().map(|&v| v as f32).collect(),
    );
    let diag = gram::diagonal(&ha, &hb, dims).unwrap();
    for i in 0..4 {
        assert!((diag[i] - c[i * 4 + i]).abs() < 1e-6, "C[{i}{i}]");
    }
}

#[test]
fn a_matrix_the_host_cannot_hold_is_an_error_not_an_abort() {
    // The direct path's D×D for D = 2^20 is 4 TiB.
    let d = 1 << 20;
    let z = vec![0.5f32; 2 * d];
    let direct =
        BarlowTwinsLoss::new(LossConfig::default().path(barlow::LossPath::Direct)).unwrap();
    let e = direct.forward_cpu(&z, &z, Dims::new(2, d)).unwrap_err();
    assert!(matches!(e, Error::OutOfHostMemory { .. }), "{e}");
    // The object still works after.
    let small = vec![0.25f32, 0.5, 1.0, 2.0, -1.0, 3.0];
    direct.forward_cpu(&small, &small, Dims::new(3, 2)).unwrap();
}

#[test]
fn a_lambda_that_would_overflow_the_gradients_is_refused() {
    for lambda in [1e30, f32::INFINITY, -1.0] {
        let r = BarlowTwinsLoss::new(LossConfig::default().lambda(lambda));
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "{lambda}");
    }
}
