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
        let e = BarlowTwinsLoss::new(LossConfig {
            lambda,
            eps,
            ..Default::default()
        });
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
