//! LARS and its schedule against hand-computed updates, and a whole Barlow Twins step's
//! gradients against finite differences of the loss.
#![cfg(feature = "train")]

mod common;

use barlow::nn::resnet::{Arch, ResNetConfig, Stem};
use barlow::nn::{Buffer, CpuBackend, Param, Tensor, Visit};
use barlow::train::{BarlowTwins, Lars, LarsConfig, ModelConfig, Schedule};
use common::Rng;

struct Two {
    w: Param,
    b: Param,
}

impl Visit for Two {
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.w);
        f(&mut self.b);
    }
    fn buffers_mut(&mut self, _: &mut dyn FnMut(&mut Buffer)) {}
}

fn close(a: f32, b: f64, what: &str) {
    assert!(
        (f64::from(a) - b).abs() < 1e-6 * b.abs().max(1.0),
        "{what}: {a} vs {b}"
    );
}

#[test]
fn lars_matches_hand_computed_updates() {
    let mut m = Two {
        w: Param::new("w", &[2, 2], vec![3.0, 0.0, 0.0, 4.0]),
        b: Param::new("b", &[2], vec![1.0, 2.0]),
    };
    m.w.grad = vec![1.0, 0.0, 0.0, 0.0];
    m.b.grad = vec![0.5, -0.5];
    let mut opt = Lars::new(
        LarsConfig::default()
            .momentum(0.9)
            .eta(0.001)
            .weight_decay(0.1),
    );
    opt.step(&mut m, 0.2, 0.01);
    // Weights: dp = g + 0.1·w = [1.3, 0, 0, 0.4]; ‖w‖ = 5, ‖dp‖ = √1.85;
    // trust q = 0.001·5/√1.85; μ = q·dp; w −= 0.2·μ.
    let q = 0.001 * 5.0 / 1.85f64.sqrt();
    close(m.w.value[0], 3.0 - 0.2 * q * 1.3, "w0");
    close(m.w.value[3], 4.0 - 0.2 * q * 0.4, "w3");
    assert_eq!(m.w.value[1], 0.0);
    // Biases: no decay, no trust ratio: b −= 0.01·g.
    close(m.b.value[0], 0.995, "b0");
    close(m.b.value[1], 2.005, "b1");
    // Second step, same gradients: μ_b = 0.9·0.5 + 0.5 = 0.95.
    opt.step(&mut m, 0.2, 0.01);
    close(m.b.value[0], 0.995 - 0.01 * 0.95, "b0 after momentum");
    close(m.b.value[1], 2.005 + 0.01 * 0.95, "b1 after momentum");
    assert_eq!(opt.momentum.len(), 2);
    assert_eq!(opt.momentum[0].0, "w");
}

#[test]
fn lars_skips_the_trust_ratio_for_zero_weights() {
    let mut m = Two {
        w: Param::new("w", &[1, 2], vec![0.0, 0.0]),
        b: Param::new("b", &[1], vec![0.0]),
    };
    m.w.grad = vec![2.0, -1.0];
    let mut opt = Lars::new(
        LarsConfig::default()
            .momentum(0.9)
            .eta(0.001)
            .weight_decay(0.0),
    );
    opt.step(&mut m, 0.5, 0.5);
    // ‖w‖ = 0: q = 1, so w = −0.5·g.
    assert_eq!(m.w.value, vec![-1.0, 0.5]);
    assert_eq!(m.b.value, vec![0.0]);
}

#[test]
fn schedule_warms_up_then_decays_to_a_thousandth() {
    let s = Schedule {
        base_lr_weights: 0.2,
        base_lr_biases: 0.0048,
        batch_size: 512,
        warmup_steps: 10,
        total_steps: 110,
    };
    // Peak = 0.2 × 512/256 = 0.4 (weights), 0.0096 (biases).
    let (w, b) = s.lr(0);
    assert_eq!((w, b), (0.0, 0.0));
    let (w, b) = s.lr(5);
    close(w, 0.2, "half warm-up");
    close(b, 0.0048, "half warm-up biases");
    close(s.lr(10).0, 0.4, "peak");
    // Half-way through the cosine: q = 0.5 → (2 + 0.002)/2 × 0.2.
    close(s.lr(60).0, 0.2002, "cosine middle");
    close(s.lr(110).0, 0.0004, "end = 0.001 × peak");
    close(s.lr(500).0, 0.0004, "past the end stays at the end");
    assert!(s.lr(30).0 > s.lr(31).0);
}

fn tiny_model(rng: &mut Rng) -> BarlowTwins {
    let config = ModelConfig::new(
        ResNetConfig::new(Arch::Resnet18, Stem::Small, 1, 4),
        vec![16, 16, 16],
    )
    .lambda(0.05);
    let mut m = BarlowTwins::new(config, rng).unwrap();
    // Every ReLU active (see nn_layers.rs): the loss is smooth in the parameters.
    m.params_mut(&mut |p| {
        if p.name.ends_with(".bias") {
            p.value
                .iter_mut()
                .for_each(|v| *v = 4.0 + rng.uniform() as f32);
        } else if p.is_vector() {
            p.value
                .iter_mut()
                .for_each(|v| *v = 0.5 + rng.uniform() as f32);
        }
    });
    m
}

#[test]
fn barlow_twins_step_gradients_match_finite_differences() {
    let be = CpuBackend;
    let mut rng = Rng::new(21);
    let _ = tiny_model(&mut rng); // advance the generator as the model's init does
    let img = |rng: &mut Rng| {
        Tensor::from_vec(
            &[12, 1, 8, 8],
            (0..12 * 64).map(|_| rng.normal() as f32).collect(),
        )
    };
    let (y1, y2) = (img(&mut rng), img(&mut rng));

    let mut m = tiny_model(&mut Rng::new(21));
    let base = m.forward_backward(&be, &y1, &y2).unwrap().total;
    let mut grads: Vec<(String, Vec<f32>)> = Vec::new();
    m.params_mut(&mut |p| grads.push((p.name.clone(), p.grad.clone())));

    let h = 1e-2f32;
    let mut checked = 0;
    for (pi, (name, g)) in grads.iter().enumerate() {
        // A unit random direction per tensor.
        let mut v: Vec<f32> = (0..g.len()).map(|_| rng.normal() as f32).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        let loss_at = |delta: f32| {
            let mut c = tiny_model(&mut Rng::new(21));
            let mut k = 0;
            c.params_mut(&mut |p| {
                if k == pi {
                    p.value
                        .iter_mut()
                        .zip(&v)
                        .for_each(|(w, d)| *w += delta * d);
                }
                k += 1;
            });
            c.forward_backward(&be, &y1, &y2).unwrap().total
        };
        let num = (loss_at(h) - loss_at(-h)) / (2.0 * f64::from(h));
        let ana: f64 = g
            .iter()
            .zip(&v)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let gnorm = g.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        // The f32 forward resolves the loss to about 1e-5 of its value (its rounding moves a
        // difference of two losses by that much), so a derivative below this is noise: for the
        // norms' biases here, steps of 2-8·h agree with the analytic value to 0.5 % where h
        // alone is 5-10 % off.
        let resolution = 2e-4 * base.abs() / f64::from(h);
        let err = (num - ana).abs() / ana.abs().max(1e-2 * gnorm).max(resolution).max(1e-9);
        assert!(
            err < 3e-2,
            "{name}: analytic {ana} numeric {num} (error {err:.2e})"
        );
        checked += 1;
    }
    assert!(checked > 40, "only {checked} tensors checked");
}

#[test]
fn training_steps_reduce_the_loss() {
    let be = CpuBackend;
    let mut rng = Rng::new(22);
    let config = ModelConfig::new(
        ResNetConfig::new(Arch::Resnet18, Stem::Small, 1, 4),
        vec![16, 16, 16],
    )
    .lambda(0.0051);
    let mut m = BarlowTwins::new(config, &mut rng).unwrap();
    let base = Tensor::from_vec(
        &[16, 1, 8, 8],
        (0..16 * 64).map(|_| rng.normal() as f32).collect(),
    );
    let noisy = |rng: &mut Rng| {
        let mut t = base.clone();
        t.data
            .iter_mut()
            .for_each(|v| *v += 0.1 * rng.normal() as f32);
        t
    };
    let mut opt = Lars::new(LarsConfig::default());
    let first = m
        .forward_backward(&be, &noisy(&mut rng), &noisy(&mut rng))
        .unwrap()
        .total;
    opt.step(&mut m, 0.2, 0.0048);
    let mut last = first;
    for _ in 0..30 {
        last = m
            .forward_backward(&be, &noisy(&mut rng), &noisy(&mut rng))
            .unwrap()
            .total;
        opt.step(&mut m, 0.2, 0.0048);
    }
    assert!(last < 0.7 * first, "loss went from {first} to {last}");
}

#[test]
fn knn_and_linear_probe_classify_separable_features() {
    use barlow::train::eval::{knn_top1, linear_probe, ProbeConfig};
    let mut rng = Rng::new(30);
    let (dim, classes) = (8, 4);
    // Class c sits around the c-th axis; unit rows for kNN.
    let sample = |rng: &mut Rng, n: usize| {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % classes;
            let mut v: Vec<f32> = (0..dim).map(|_| 0.2 * rng.normal() as f32).collect();
            v[c] += 1.0;
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            x.extend(v.iter().map(|a| a / norm));
            y.push(c as u32);
        }
        (x, y)
    };
    let (xb, yb) = sample(&mut rng, 400);
    let (xt, yt) = sample(&mut rng, 200);
    let acc = knn_top1(&xb, &yb, &xt, &yt, dim, classes, 20, 0.1).unwrap();
    assert!(acc > 0.95, "kNN {acc}");
    // Labels shuffled: chance level.
    let mut ys = yb.clone();
    ys.rotate_left(1);
    let chance = knn_top1(&xb, &ys, &xt, &yt, dim, classes, 20, 0.1).unwrap();
    assert!(chance < 0.5, "kNN on shuffled labels {chance}");
    let cfg = ProbeConfig::default().epochs(20).batch(64);
    let mut losses = Vec::new();
    let acc = linear_probe(&xb, &yb, &xt, &yt, dim, classes, cfg, |_, l| losses.push(l)).unwrap();
    assert!(acc > 0.95, "probe {acc}");
    assert!(losses.last().unwrap() < &losses[0]);

    // Settings that make no sense, and features that do not match their labels, are errors
    // rather than an accuracy.
    let knn = |x: &[f32], y: &[u32], k, t| knn_top1(x, y, &xt, &yt, dim, classes, k, t);
    for (what, r) in [
        ("k = 0", knn(&xb, &yb, 0, 0.1)),
        ("t = 0", knn(&xb, &yb, 20, 0.0)),
        ("t = NaN", knn(&xb, &yb, 20, f32::NAN)),
        ("short bank", knn(&xb[..xb.len() - 1], &yb, 20, 0.1)),
        (
            "label >= classes",
            knn(&xb, &vec![classes as u32; yb.len()], 20, 0.1),
        ),
    ] {
        assert!(
            matches!(r, Err(barlow::Error::InvalidConfig(_))),
            "{what}: {r:?}"
        );
    }
    let probe = |c: ProbeConfig| linear_probe(&xb, &yb, &xt, &yt, dim, classes, c, |_, _| {});
    for (what, c) in [
        ("epochs = 0", cfg.epochs(0)),
        ("lr = NaN", cfg.lr(f32::NAN)),
        ("lr = 0", cfg.lr(0.0)),
        ("batch = 0", cfg.batch(0)),
    ] {
        assert!(
            matches!(probe(c), Err(barlow::Error::InvalidConfig(_))),
            "{what}"
        );
    }
}

/// The kNN vote in float64 log space: for each test row, the class whose k nearest bank rows
/// have the largest log Σ exp(s / t) (ties to the lower class).
#[allow(clippy::too_many_arguments)]
fn knn_reference(
    bank: &[f32],
    yb: &[u32],
    test: &[f32],
    yt: &[u32],
    dim: usize,
    classes: usize,
    k: usize,
    t: f64,
) -> f64 {
    let mut hits = 0;
    for (row, &label) in test.chunks_exact(dim).zip(yt) {
        let mut sims: Vec<(f64, u32)> = bank
            .chunks_exact(dim)
            .zip(yb)
            .map(|(b, &l)| {
                let s: f64 = b
                    .iter()
                    .zip(row)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum();
                (s, l)
            })
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top = &sims[..k];
        let best = (0..classes)
            .map(|c| {
                let logs: Vec<f64> = top
                    .iter()
                    .filter(|s| s.1 as usize == c)
                    .map(|s| s.0 / t)
                    .collect();
                let m = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = if m.is_finite() {
                    m + logs.iter().map(|l| (l - m).exp()).sum::<f64>().ln()
                } else {
                    f64::NEG_INFINITY
                };
                (c, lse)
            })
            .fold((0, f64::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
        hits += usize::from(best.0 as u32 == label);
    }
    hits as f64 / yt.len() as f64
}

#[test]
fn knn_votes_stay_finite_at_every_temperature() {
    use barlow::train::eval::knn_top1;
    let mut rng = Rng::new(41);
    let (dim, classes) = (16, 5);
    let sample = |rng: &mut Rng, n: usize| {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = i % classes;
            let mut v: Vec<f32> = (0..dim).map(|_| 0.6 * rng.normal() as f32).collect();
            v[c] += 1.0;
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            x.extend(v.iter().map(|a| a / norm));
            y.push(c as u32);
        }
        (x, y)
    };
    let (xb, yb) = sample(&mut rng, 300);
    let (xt, yt) = sample(&mut rng, 150);
    let nearest = knn_top1(&xb, &yb, &xt, &yt, dim, classes, 1, 0.1).unwrap();
    for t in [1e-4, 3e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0] {
        let acc = knn_top1(&xb, &yb, &xt, &yt, dim, classes, 20, t as f32).unwrap();
        let want = knn_reference(&xb, &yb, &xt, &yt, dim, classes, 20, f64::from(t as f32));
        // A test row whose top two class scores tie to rounding may go either way.
        assert!(
            (acc - want).abs() <= 1.5 / yt.len() as f64,
            "t = {t}: {acc} against the float64 log-space vote {want}"
        );
        assert!(acc > 0.35, "t = {t}: {acc} (chance is 0.2)");
    }
    // As t falls the vote tends to the nearest neighbour's.
    let tiny = knn_top1(&xb, &yb, &xt, &yt, dim, classes, 20, 1e-4).unwrap();
    assert_eq!(tiny, nearest);
}

#[test]
fn a_probe_or_features_that_diverge_give_an_error_not_an_accuracy() {
    use barlow::train::eval::{knn_top1, linear_probe, ProbeConfig};
    let mut rng = Rng::new(5);
    let (dim, classes) = (6, 3);
    let x: Vec<f32> = (0..60 * dim).map(|_| rng.normal() as f32).collect();
    let y: Vec<u32> = (0..60).map(|i| (i % classes) as u32).collect();
    let cfg = ProbeConfig::default().epochs(3).batch(16).lr(1e30);
    let r = linear_probe(&x, &y, &x, &y, dim, classes, cfg, |_, _| {});
    match r {
        Err(e @ barlow::Error::Diverged { .. }) => {
            assert!(e.to_string().contains("--lr"), "{e}")
        }
        other => panic!("expected a divergence, got {other:?}"),
    }
    let mut bad = x.clone();
    bad[7] = f32::NAN;
    let r = knn_top1(&bad, &y, &x, &y, dim, classes, 5, 0.1);
    assert!(matches!(r, Err(barlow::Error::Diverged { .. })), "{r:?}");
    let r = linear_probe(&x, &y, &bad, &y, dim, classes, cfg.lr(0.1), |_, _| {});
    assert!(matches!(r, Err(barlow::Error::Diverged { .. })), "{r:?}");
}
