//! Trains a tiny candle model with the fused Barlow Twins loss for a few steps, on the CPU.
//!
//! The model is one linear projection W (8 → 32) applied to two noisy views of the same random
//! points; the loss pulls the views' features together and decorrelates them. Each step also
//! checks the op against barlow's float64 reference: the loss, and and the gradient autograd gives the
//! projection W. Run with `cargo run --example candle_train --features candle`.

use barlow::candle::BarlowTwinsOp;
use barlow::cpu::reference;
use barlow::{Dims, LossConfig};
use candle_core::{DType, Device, Tensor, Var};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (n, d_in, d) = (64, 8, 32);
    let config = LossConfig::default();
    let op = BarlowTwinsOp::new(config)?;
    let w =
        Var::from_tensor(&(Tensor::randn(0f32, 1.0, (d_in, d), &dev)? / (d_in as f64).sqrt())?)?;
    let x = Tensor::randn(0f32, 1.0, (n, d_in), &dev)?;
    let lr = 0.05;
    let mut first = None;
    let mut last = 0.0;
    for step in 0..20 {
        let va = (&x + Tensor::randn(0f32, 0.1, (n, d_in), &dev)?)?;
        let vb = (&x + Tensor::randn(0f32, 0.1, (n, d_in), &dev)?)?;
        let za = va.matmul(w.as_tensor())?;
        let zb = vb.matmul(w.as_tensor())?;
        let loss = op.loss(&za, &zb)?;
        let grads = loss.backward()?;

        // The op against the float64 reference, on this step's features.
        let a64 = za.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let b64 = zb.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let dims = Dims::new(n, d);
        let r = reference::forward_backward(
            &a64,
            &b64,
            dims,
            f64::from(config.lambda),
            f64::from(config.eps),
        )?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        let loss_err = (value - r.total).abs() / r.total.abs().max(1.0);
        // Autograd's dL/dW = Vaᵀ·dL/dZa + Vbᵀ·dL/dZb, against the same from the f64 gradients.
        let gw = grads.get(w.as_tensor()).ok_or("no gradient for W")?;
        let got = gw.flatten_all()?.to_vec1::<f32>()?;
        let va64 = va.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let vb64 = vb.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let mut want = vec![0f64; d_in * d];
        for i in 0..n {
            for k in 0..d_in {
                for j in 0..d {
                    want[k * d + j] += va64[i * d_in + k] * r.grad_za[i * d + j]
                        + vb64[i * d_in + k] * r.grad_zb[i * d + j];
                }
            }
        }
        let scale = want.iter().fold(0f64, |m, g| m.max(g.abs())).max(1e-30);
        let grad_err = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (&g, &e)| m.max((f64::from(g) - e).abs() / scale));
        println!(
            "step {step:2}  loss {value:10.4}  vs f64: loss {loss_err:.1e}, dL/dW {grad_err:.1e}"
        );
        if loss_err > 1e-5 || grad_err > 1e-5 {
            return Err(format!("step {step}: the op is off the float64 reference").into());
        }

        w.set(&(w.as_tensor() - (gw * lr)?)?)?;
        first.get_or_insert(value);
        last = value;
    }
    let first = first.unwrap_or(last);
    println!("loss {first:.4} -> {last:.4}");
    if last >= first {
        return Err("the loss did not go down".into());
    }
    Ok(())
}
