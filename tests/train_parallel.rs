//! Data-parallel training on the CPU engine: W ranks (threads of one process) of N images each
//! take the step one rank takes on the W·N images — loss, every parameter gradient, the running
//! statistics, and the parameters after LARS — with batch norm synchronized over the ranks.
#![cfg(feature = "train")]

mod common;

use barlow::collective::{Collective, LocalGroup};
use barlow::nn::resnet::{Arch, ResNetConfig, Stem};
use barlow::nn::{CpuBackend, Tensor, Visit};
use barlow::train::{BarlowTwins, Lars, LarsConfig, ModelConfig};
use common::*;
use std::time::Duration;

fn model(arch: Arch, stem: Stem) -> BarlowTwins {
    let cfg = ModelConfig::new(ResNetConfig::new(arch, stem, 3, 4), vec![16, 12, 8]);
    BarlowTwins::new(cfg, &mut Rng::new(7)).unwrap()
}

fn images(rng: &mut Rng, n: usize, side: usize) -> Tensor {
    let data = (0..n * 3 * side * side)
        .map(|_| rng.uniform() as f32 - 0.5)
        .collect();
    Tensor::from_vec(&[n, 3, side, side], data)
}

fn rows(t: &Tensor, from: usize, n: usize) -> Tensor {
    let item = t.item_len();
    let mut shape = t.shape.clone();
    shape[0] = n;
    Tensor::from_vec(&shape, t.data[from * item..(from + n) * item].to_vec())
}

/// Everything a step leaves: gradients, values and buffers, by name.
type State = Vec<(String, Vec<f32>)>;

fn state(m: &mut BarlowTwins) -> State {
    let mut out = Vec::new();
    m.params_mut(&mut |p| {
        out.push((format!("{} grad", p.name), p.grad.clone()));
        out.push((p.name.clone(), p.value.clone()));
    });
    m.buffers_mut(&mut |b| out.push((b.name.clone(), b.value.clone())));
    out
}

fn check_equivalence(arch: Arch, stem: Stem, side: usize, world: usize, n: usize) {
    let mut rng = Rng::new(11);
    let total = world * n;
    let steps: Vec<(Tensor, Tensor)> = (0..2)
        .map(|_| (images(&mut rng, total, side), images(&mut rng, total, side)))
        .collect();
    let be = CpuBackend;
    let lars = || Lars::new(LarsConfig::default());

    // One rank, every image.
    let mut whole = model(arch, stem);
    let mut opt = lars();
    let mut whole_losses = Vec::new();
    let mut whole_states = Vec::new();
    for (a, b) in &steps {
        whole_losses.push(whole.forward_backward(&be, a, b).unwrap().total);
        whole_states.push(state(&mut whole));
        opt.step(&mut whole, 0.5, 0.01);
    }

    // W ranks, N images each.
    let ranks = LocalGroup::with_timeout(world, Duration::from_secs(120)).unwrap();
    let per_rank: Vec<(Vec<f64>, Vec<State>)> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|g| {
                let steps = &steps;
                s.spawn(move || {
                    let mut m = model(arch, stem);
                    let mut opt = lars();
                    let (mut losses, mut states) = (Vec::new(), Vec::new());
                    for (a, b) in steps {
                        let (a, b) = (rows(a, g.rank() * n, n), rows(b, g.rank() * n, n));
                        let v = m.forward_backward_across(&CpuBackend, &g, &a, &b).unwrap();
                        losses.push(v.total);
                        states.push(state(&mut m));
                        opt.step(&mut m, 0.5, 0.01);
                    }
                    (losses, states)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for (rank, (losses, states)) in per_rank.iter().enumerate() {
        for step in 0..steps.len() {
            let what = format!("{arch:?} {stem:?} W={world} N={n} rank {rank} step {step}");
            assert_close_scalar(
                &format!("{what} loss"),
                losses[step],
                whole_losses[step],
                1e-5,
            );
            // The ranks agree bit for bit: the sums are taken in rank order on every rank.
            assert_eq!(states[step], per_rank[0].1[step], "{what}: ranks differ");
            for ((name, got), (name2, want)) in states[step].iter().zip(&whole_states[step]) {
                assert_eq!(name, name2);
                if name.ends_with("num_batches_tracked") {
                    assert_eq!(got, want, "{what} {name}");
                    continue;
                }
                let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
                // Gradients and values: sums over a different split of the batch round
                // differently; 1e-4 of each tensor's largest entry.
                assert_close(&format!("{what} {name}"), got, &want, 1e-4);
            }
        }
    }
}

#[test]
fn two_ranks_take_the_step_of_one_rank_on_both_halves() {
    check_equivalence(Arch::Resnet18, Stem::Small, 8, 2, 3);
}

#[test]
fn three_ranks_with_bottlenecks_and_the_imagenet_stem() {
    check_equivalence(Arch::Resnet50, Stem::Imagenet, 16, 3, 2);
}

#[test]
fn a_rank_with_another_batch_size_is_an_error_on_every_rank() {
    let ranks = LocalGroup::with_timeout(2, Duration::from_secs(60)).unwrap();
    let mut rng = Rng::new(3);
    let y = images(&mut rng, 5, 8);
    let out: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|g| {
                let y = &y;
                s.spawn(move || {
                    let mut m = model(Arch::Resnet18, Stem::Small);
                    let a = rows(y, 0, 2 + g.rank());
                    m.forward_backward_across(&CpuBackend, &g, &a, &a)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in out {
        assert!(r.is_err(), "{r:?}");
    }
}
