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
    matches_the_reference(&Device::Cpu, true);
}

/// The same on CUDA tensors: the op reads their device memory in place and returns the loss as a
/// device tensor. On the virtual CUDA device (which runs barlow's kernels, not candle's) the
/// autograd part, whose scaling is a candle kernel, is left to a GPU.
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
    let stream = dev.as_cuda_device().unwrap().cuda_stream();
    let on_gpu = !barlow::cuda::is_virtual(stream.context());
    matches_the_reference(&dev, on_gpu);
    if !on_gpu {
        println!("virtual CUDA device: loss and gradients() checked; autograd runs on a GPU");
    }

    let op = BarlowTwinsOp::new(LossConfig::default()).unwrap();
    let mut rng = Rng::new(91);
    let a = on(&dev, &rng.matrix(8, 4), 8, 4);
    let loss = op.loss(&a, &a).unwrap();
    assert!(loss.device().is_cuda(), "the loss left the device");
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    let f64s = Tensor::from_slice(&[0.5f64; 32], (8, 4), &dev).unwrap();
    assert!(err(op.loss(&f64s, &f64s)).contains("f32"), "f64 input");
    let t = on(&dev, &rng.matrix(4, 8), 4, 8).t().unwrap();
    assert!(err(op.loss(&t, &t)).contains("contiguous"), "strided input");
    let other = on(&dev, &rng.matrix(8, 5), 8, 5);
    assert!(err(op.loss(&a, &other)).contains("one shape"), "shapes");
}

/// The loss and both gradients against the f64 reference; with `autograd`, through candle's
/// backward (scaled by an incoming gradient), else through [`BarlowTwinsOp::gradients`] alone.
fn matches_the_reference(dev: &Device, autograd: bool) {
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

        let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
        let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
        // Without autograd: the op's own gradient outputs.
        let (da, db) = op.gradients(va.as_tensor(), vb.as_tensor()).unwrap();
        assert_eq!(da.dims(), &[n, d]);
        let (da, db) = (values(&da), values(&db));
        assert_close_grad(
            &format!("{what} gradients() dza"),
            &da,
            &r.grad_za,
            sa,
            1e-5,
        );
        assert_close_grad(
            &format!("{what} gradients() dzb"),
            &db,
            &r.grad_zb,
            sb,
            1e-5,
        );
        if !autograd {
            continue;
        }

        // Through autograd, scaled by the incoming gradient: d(2.5·L)/dZ = 2.5·dL/dZ.
        let grads = (loss * 2.5).unwrap().backward().unwrap();
        let ga = values(grads.get(va.as_tensor()).unwrap());
        let gb = values(grads.get(vb.as_tensor()).unwrap());
        let scaled = |g: &[f64]| g.iter().map(|x| 2.5 * x).collect::<Vec<_>>();
        assert_close_grad(
            &format!("{what} dza"),
            &ga,
            &scaled(&r.grad_za),
            2.5 * sa,
            1e-5,
        );
        assert_close_grad(
            &format!("{what} dzb"),
            &gb,
            &scaled(&r.grad_zb),
            2.5 * sb,
            1e-5,
        );
        // The same numbers as the op's own outputs.
        let unscaled_a: Vec<f32> = ga.iter().map(|g| g / 2.5).collect();
        assert_close(
            &format!("{what} autograd vs gradients()"),
            &da,
            &to_f64(&unscaled_a),
            1e-6,
        );
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
