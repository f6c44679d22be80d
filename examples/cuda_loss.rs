//! The fused loss on a CUDA stream: the waiting call, then the one that leaves the loss in device
//! memory and waits for nothing. `cargo run --release --example cuda_loss`. Without a GPU it says
//! what is missing and exits.

use barlow::rng::Rng;
use barlow::{BarlowTwinsLoss, Dims, LossConfig};

fn main() -> barlow::Result<()> {
    let stream = match barlow::cuda::open_stream(0) {
        Ok(s) => s,
        Err(e) if e.is_unavailable() => {
            println!("no GPU to run on: {e}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    println!("on {}", barlow::cuda::device_label(&stream));
    let (n, d) = (512, 1024);
    let dims = Dims::new(n, d);
    let mut rng = Rng::new(0);
    let za = rng.matrix(n, d);
    let zb = rng.correlated(&za, 0.3);
    let (za, zb) = (stream.clone_htod(&za)?, stream.clone_htod(&zb)?);
    let mut dza = stream.alloc_zeros::<f32>(n * d)?;
    let mut dzb = stream.alloc_zeros::<f32>(n * d)?;
    let loss = BarlowTwinsLoss::new(LossConfig::default())?;

    let v = loss.forward_backward(&stream, &za, &zb, dims, &mut dza, &mut dzb)?;
    println!("waiting call: loss {:.4} ({:?} path)", v.total, v.path);

    let mut out = stream.alloc_zeros::<f32>(barlow::cuda::DEVICE_LOSS_SLOTS)?;
    loss.forward_backward_on_device(&stream, &za, &zb, dims, &mut dza, &mut dzb, &mut out)?;
    // The host reads it only here, for the print; a trainer would queue its backward pass instead.
    let host = stream.clone_dtoh(&out)?;
    println!(
        "on device: loss {:.4} = {:.4} + {:.4}, non-finite flag {}",
        host[barlow::cuda::LOSS_TOTAL],
        host[barlow::cuda::LOSS_ON_DIAG],
        host[barlow::cuda::LOSS_OFF_DIAG],
        host[barlow::cuda::LOSS_NON_FINITE]
    );
    Ok(())
}
