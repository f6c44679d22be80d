//! Training steps after the first reuse every tensor buffer: no step allocates an activation or a
//! gradient anew. Its own test binary, so no other test shares the process-wide pool.
#![cfg(feature = "train")]

use barlow::nn::resnet::{Arch, ResNetConfig, Stem};
use barlow::nn::{buffer_stats, CpuBackend, Tensor};
use barlow::rng::Rng;
use barlow::train::{BarlowTwins, Lars, LarsConfig, ModelConfig};

#[test]
fn steps_after_the_first_take_every_buffer_from_the_pool() {
    let be = CpuBackend;
    let mut rng = Rng::new(4);
    let config = ModelConfig::new(
        ResNetConfig::new(Arch::Resnet18, Stem::Small, 3, 8),
        vec![64, 64, 64],
    );
    let mut model = BarlowTwins::new(config, &mut rng).unwrap();
    let mut opt = Lars::new(LarsConfig::default());
    let img = |rng: &mut Rng| {
        let len = 16 * 3 * 16 * 16;
        Tensor::from_vec(
            &[16, 3, 16, 16],
            (0..len).map(|_| rng.normal() as f32).collect(),
        )
    };
    let (y1, y2) = (img(&mut rng), img(&mut rng));
    let mut step = |model: &mut BarlowTwins| {
        let loss = model.forward_backward(&be, &y1, &y2).unwrap().total;
        opt.step(model, 0.01, 0.001);
        loss
    };
    let first = step(&mut model);
    let after_first = buffer_stats();
    assert!(
        after_first.fresh > 10,
        "the first step allocates: {after_first:?}"
    );
    let mut last = first;
    for _ in 0..3 {
        last = step(&mut model);
    }
    let after = buffer_stats();
    assert!(
        last.is_finite() && last != first,
        "the model trains: {first} then {last}"
    );
    assert_eq!(
        after.fresh, after_first.fresh,
        "a later step allocated: {after_first:?} then {after:?}"
    );
    assert!(after.reused >= 3 * after_first.fresh, "{after:?}");
}
