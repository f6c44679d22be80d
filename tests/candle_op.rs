//! The candle op against the float64 reference: the loss, both gradients through candle's
//! autograd (scaled by the incoming gradient), and typed refusals of bad tensors.
#![cfg(feature = "candle")]

mod common;

use barlow::candle::BarlowTwinsOp;
use barlow::cpu::reference;
use barlow::{Dims, LossConfig};
use candle_core::{DType, Device, Tensor, Var};
use common::*;

fn tensor(x: &[f32], n: usize, d: usize) -> Tensor {
    on(&Device::Cpu, x, n, d)
}

fn on(dev: &Device, x: &[f32], n: usize, d: usize) -> Tensor {
    Tensor::from_slice(x, (n, d), dev).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn loss_and_autograd_gradients_match_the_reference() {
    matches_the_reference(&Device::Cpu);
}

/// The same on CUDA tensors: the op reads their device memory in place and returns the loss as a
/// CUDA tensor (candle's own kernels scale the gradients, so this runs on a GPU, not on the
/// virtual device).
#[cfg(feature = "candle-cuda")]
#[test]
fn on_cuda_tensors_loss_and_gradients_match_the_reference() {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            let why = format!("no CUDA device for candle: {e}");
            if std::env::var("BARLOW_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("on_cuda_tensors_loss_and_gradients_match_the_reference: {why}");
            }
            println!("SKIP: on_cuda_tensors_loss_and_gradients_match_the_reference: {why}");
            return;
        }
    };
    matches_the_reference(&dev);
    let op = BarlowTwinsOp::new(LossConfig::default()).unwrap();
    let a = Tensor::randn(0f32, 1.0, (8, 4), &dev).unwrap();
    let loss = op.loss(&a, &a).unwrap();
    assert!(loss.device().is_cuda(), "the loss left the device");
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let f64s = a.to_dtype(DType::F64).unwrap();
    assert!(err(op.loss(&f64s, &f64s)).contains("f32"), "f64 input");
    let t = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap().t().unwrap();
    assert!(err(op.loss(&t, &t)).contains("contiguous"), "strided input");
    let other = Tensor::randn(0f32, 1.0, (8, 5), &dev).unwrap();
    assert!(err(op.loss(&a, &other)).contains("one shape"), "shapes");
}

fn matches_the_reference(dev: &Device) {
    let mut rng = Rng::new(90);
    let cfg = LossConfig::default();
    let op = BarlowTwinsOp::new(cfg).unwrap();
    for &(n, d) in &[(2, 1), (37, 13), (129, 70)] {
        let za = rng.matrix(n, d);
        let zb = rng.correlated(&za, 0.5);
        let r = reference::forward_backward(
            &to_f64(&za),
            &to_f64(&zb),
            Dims::new(n, d),
            f64::from(cfg.lambda),
            f64::from(cfg.eps),
        )
        .unwrap();
        let va = Var::from_tensor(&on(dev, &za, n, d)).unwrap();
        let vb = Var::from_tensor(&on(dev, &zb, n, d)).unwrap();
        let loss = op.loss(va.as_tensor(), vb.as_tensor()).unwrap();
        assert_eq!(loss.dims(), &[] as &[usize], "the loss is a 0-d tensor");
        assert_eq!(loss.dtype(), DType::F32);
        let what = format!("candle {dev:?} N={n} D={d}");
        // Relative to the loss's sensitivity to rounding C, as the other loss tests measure it
        // (near C ≈ I the value is far smaller than what rounding alone moves it by).
        let v = f64::from(loss.to_scalar::<f32>().unwrap());
        let (s_on, s_off) = loss_sensitivity(&r, f64::from(cfg.lambda));
        let e = (v - r.total).abs() / r.total.abs().max(s_on + s_off);
        assert!(
            e <= 1e-5,
            "{what}: loss {v} vs reference {}: error {e:.2e}",
            r.total
        );

        // The incoming gradient scales both outputs: d(2.5·L)/dZ = 2.5·dL/dZ.
        let grads = (loss * 2.5).unwrap().backward().unwrap();
        let ga = values(grads.get(va.as_tensor()).unwrap());
        let gb = values(grads.get(vb.as_tensor()).unwrap());
        let scaled = |g: &[f64]| g.iter().map(|x| 2.5 * x).collect::<Vec<_>>();
        let sa = 2.5 * grad_scale(&r.a.rstd, &r.grad_za_hat);
        let sb = 2.5 * grad_scale(&r.b.rstd, &r.grad_zb_hat);
        assert_close_grad(&format!("{what} dza"), &ga, &scaled(&r.grad_za), sa, 1e-5);
        assert_close_grad(&format!("{what} dzb"), &gb, &scaled(&r.grad_zb), sb, 1e-5);

        // The gradients without autograd are the same numbers.
        let (da, db) = op.gradients(va.as_tensor(), vb.as_tensor()).unwrap();
        assert_eq!(da.dims(), &[n, d]);
        let unscaled_a: Vec<f32> = ga.iter().map(|g| g / 2.5).collect();
        assert_close(
            &format!("{what} gradients()"),
            &values(&da),
            &to_f64(&unscaled_a),
            1e-6,
        );
        assert_eq!(db.dims(), &[n, d]);
    }
}

#[test]
fn bad_tensors_are_errors_that_name_the_problem() {
    let op = BarlowTwinsOp::new(LossConfig::default()).unwrap();
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (8, 4), &dev).unwrap();
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();

    let other = Tensor::randn(0f32, 1.0, (8, 5), &dev).unwrap();
    assert!(
        err(op.loss(&a, &other)).contains("one shape"),
        "shape mismatch"
    );
    let flat = Tensor::randn(0f32, 1.0, 32, &dev).unwrap();
    assert!(err(op.loss(&flat, &flat)).contains("N×D"), "1-d input");
    let f64s = a.to_dtype(DType::F64).unwrap();
    assert!(err(op.loss(&f64s, &f64s)).contains("f32"), "f64 input");
    let t = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap().t().unwrap();
    assert!(err(op.loss(&t, &t)).contains("contiguous"), "strided input");
    let one = Tensor::randn(0f32, 1.0, (1, 4), &dev).unwrap();
    assert!(err(op.loss(&one, &one)).contains("N >= 2"), "one row");
    let mut nan = values(&a);
    nan[3] = f32::NAN;
    let nan = tensor(&nan, 8, 4);
    assert!(err(op.loss(&nan, &a)).contains("non-finite"), "NaN input");
    assert!(BarlowTwinsOp::new(LossConfig::default().lambda(f32::NAN)).is_err());
}
