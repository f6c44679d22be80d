//! The fused loss on host slices: value, terms and gradients, checked against the float64
//! reference. `cargo run --release --example cpu_loss --no-default-features` builds only the loss.

use barlow::cpu::reference;
use barlow::rng::Rng;
use barlow::{BarlowTwinsLoss, Dims, LossConfig};

fn main() -> barlow::Result<()> {
    let (n, d) = (256, 512);
    let mut rng = Rng::new(0);
    let za = rng.matrix(n, d);
    let zb = rng.correlated(&za, 0.3);
    let config = LossConfig::default();
    let loss = BarlowTwinsLoss::new(config)?;
    let (mut dza, mut dzb) = (vec![0.0; n * d], vec![0.0; n * d]);
    let v = loss.forward_backward_cpu(&za, &zb, Dims::new(n, d), &mut dza, &mut dzb)?;
    println!(
        "N={n} D={d} ({:?} path): loss {:.4} = on-diagonal {:.4} + off-diagonal {:.4}",
        v.path, v.total, v.on_diag, v.off_diag
    );

    let f64s = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    let r = reference::forward_backward(
        &f64s(&za),
        &f64s(&zb),
        Dims::new(n, d),
        f64::from(config.lambda),
        f64::from(config.eps),
    )?;
    let max_abs = |x: &[f64]| x.iter().fold(0f64, |m, v| m.max(v.abs()));
    let grad_err = dza
        .iter()
        .zip(&r.grad_za)
        .fold(0f64, |m, (&g, &e)| m.max((f64::from(g) - e).abs()))
        / max_abs(&r.grad_za);
    println!(
        "vs float64: loss {:.1e}, dL/dZa {grad_err:.1e}",
        (v.total - r.total).abs() / r.total
    );
    Ok(())
}
