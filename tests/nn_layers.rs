//! Every layer's backward pass against central finite differences of `L = Σ y ⊙ r` for a random r,
//! for the input and for sampled parameter entries; blocks, backbones and the projector too.
#![cfg(feature = "train")]

mod common;

use barlow::nn::resnet::{Arch, Projector, ResNet, ResNetConfig, Stem};
use barlow::nn::{BatchNorm, Conv2d, CpuBackend, Linear, MaxPool, Param, Relu, Tensor, Visit};
use common::Rng;

const BE: CpuBackend = CpuBackend;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.normal() as f32).collect())
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Something with a forward, a backward that returns dL/dx, and parameters.
trait Checked: Clone {
    fn fwd(&mut self, x: &Tensor) -> Tensor;
    fn bwd(&mut self, dy: &Tensor) -> Tensor;
    fn params(&mut self, f: &mut dyn FnMut(&mut Param)) {
        let _ = f;
    }
}

/// Compares analytic and numeric gradients of L = Σ fwd(x) ⊙ r for up to `samples` entries of the
/// input and of each parameter, and along a random direction per parameter tensor. Errors are
/// relative to the largest analytic gradient entry (or the directional derivative).
fn grad_check<L: Checked>(
    what: &str,
    layer: &L,
    x: &Tensor,
    samples: usize,
    check_input: bool,
    seed: u64,
) {
    grad_check_h(what, layer, x, samples, check_input, seed, 1e-3)
}

fn grad_check_h<L: Checked>(
    what: &str,
    layer: &L,
    x: &Tensor,
    samples: usize,
    check_input: bool,
    seed: u64,
    h: f32,
) {
    // Single entries for shallow layers; deep stacks are checked along random directions only.
    let elements = check_input;
    let mut rng = Rng::new(seed);
    let mut l = layer.clone();
    let y = l.fwd(x);
    let r = randn(&mut rng, &y.shape);
    let dx = l.bwd(&r);
    let loss = |layer: &L, x: &Tensor| -> f64 {
        let mut c = layer.clone();
        dot(&c.fwd(x), &r)
    };
    let tol = 2e-2;
    let base = loss(layer, x);
    let mut worst = 0f64;
    if check_input {
        let scale = dx.data.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        for _ in 0..samples {
            let i = (rng.next_u64() % x.len() as u64) as usize;
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp.data[i] += h;
            xm.data[i] -= h;
            let num = (loss(layer, &xp) - loss(layer, &xm)) / (2.0 * f64::from(h));
            let err = (num - f64::from(dx.data[i])).abs() / scale.max(1e-6);
            worst = worst.max(err);
            assert!(
                err < tol,
                "{what}: dx[{i}] analytic {} numeric {num} (error {err:.2e})",
                dx.data[i]
            );
        }
    }
    // Parameter gradients, read from the layer that ran backward.
    let mut grads: Vec<(String, Vec<f32>)> = Vec::new();
    l.params(&mut |p| grads.push((p.name.clone(), p.grad.clone())));
    let perturb = |pi: usize, dir: &dyn Fn(usize) -> f32, delta: f32| {
        let mut c = layer.clone();
        let mut k = 0;
        c.params(&mut |p| {
            if k == pi {
                p.value
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v += delta * dir(j));
            }
            k += 1;
        });
        loss(&c, x)
    };
    for (pi, (name, grad)) in grads.iter().enumerate() {
        if elements {
            let scale = grad.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            for _ in 0..samples.min(grad.len()) {
                let j = (rng.next_u64() % grad.len() as u64) as usize;
                let e = |i: usize| if i == j { 1.0 } else { 0.0 };
                let num = (perturb(pi, &e, h) - perturb(pi, &e, -h)) / (2.0 * f64::from(h));
                let err = (num - f64::from(grad[j])).abs() / scale.max(1e-6);
                worst = worst.max(err);
                assert!(
                    err < tol,
                    "{what}: {name}[{j}] analytic {} numeric {num} (error {err:.2e})",
                    grad[j]
                );
            }
        }
        // A random direction over the whole tensor: robust where single entries sit near a
        // ReLU kink of a deep network.
        let mut v: Vec<f32> = (0..grad.len()).map(|_| rng.normal() as f32).collect();
        let vn = v.iter().map(|d| d * d).sum::<f32>().sqrt();
        v.iter_mut().for_each(|d| *d /= vn);
        let dir = |j: usize| v[j];
        let num = (perturb(pi, &dir, h) - perturb(pi, &dir, -h)) / (2.0 * f64::from(h));
        let ana: f64 = grad
            .iter()
            .zip(&v)
            .map(|(g, d)| f64::from(*g) * f64::from(*d))
            .sum();
        let norm = grad
            .iter()
            .map(|g| f64::from(*g).powi(2))
            .sum::<f64>()
            .sqrt()
            * v.iter().map(|d| f64::from(*d).powi(2)).sum::<f64>().sqrt();
        // Finite differences of a deep f32 network resolve no better than ~1e-4·|L| over 2h
        // (rounding accumulates through every layer); smaller derivatives are checked per layer.
        let resolution = 1e-4 * base.abs() / f64::from(h);
        let err = (num - ana).abs() / ana.abs().max(1e-2 * norm).max(resolution).max(1e-6);
        worst = worst.max(err);
        assert!(err < tol, "{what}: {name} along a random direction: analytic {ana} numeric {num} (error {err:.2e})");
    }
    println!("{what}: worst relative gradient error {worst:.2e}");
}

impl Checked for Conv2d {
    fn fwd(&mut self, x: &Tensor) -> Tensor {
        self.forward(&BE, x, true)
    }
    fn bwd(&mut self, dy: &Tensor) -> Tensor {
        self.backward(&BE, dy, true).unwrap()
    }
    fn params(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
    }
}

#[test]
fn conv2d_gradients() {
    let mut rng = Rng::new(1);
    // (in, out, k, stride, pad, h, w): 3×3, strided, pointwise, strided pointwise, the 7×7 stem.
    for &(ci, co, k, s, p, h, w) in &[
        (3, 4, 3, 1, 1, 7, 6),
        (2, 3, 3, 2, 1, 9, 8),
        (5, 4, 1, 1, 0, 5, 5),
        (4, 6, 1, 2, 0, 7, 7),
        (3, 2, 7, 2, 3, 11, 10),
    ] {
        let conv = Conv2d::new("c", ci, co, k, s, p, &mut rng);
        let x = randn(&mut rng, &[3, ci, h, w]);
        grad_check(&format!("conv {k}x{k} s{s} p{p}"), &conv, &x, 25, true, 2);
    }
}

impl Checked for BatchNorm {
    fn fwd(&mut self, x: &Tensor) -> Tensor {
        self.forward(&BE, x, true)
    }
    fn bwd(&mut self, dy: &Tensor) -> Tensor {
        self.backward(&BE, dy)
    }
    fn params(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
        f(&mut self.bias);
    }
}

#[test]
fn batch_norm_gradients_2d_and_1d() {
    let mut rng = Rng::new(3);
    let mut bn = BatchNorm::new("bn", 4, 1.0);
    bn.weight.value = (0..4).map(|_| rng.normal() as f32).collect();
    bn.bias.value = (0..4).map(|_| rng.normal() as f32).collect();
    let x = randn(&mut rng, &[5, 4, 3, 3]);
    grad_check("bn2d", &bn, &x, 30, true, 4);
    let x = randn(&mut rng, &[7, 4]);
    grad_check("bn1d", &bn, &x, 30, true, 5);
}

#[test]
fn batch_norm_running_statistics_and_eval() {
    let mut rng = Rng::new(6);
    let mut bn = BatchNorm::new("bn", 2, 1.0);
    let x = Tensor::from_vec(&[4, 2], vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 6.0, 40.0]);
    bn.forward(&BE, &x, true);
    // mean (3, 25), unbiased var (4.6667, 166.667): running = 0.9·init + 0.1·batch.
    let rm = &bn.running_mean.value;
    let rv = &bn.running_var.value;
    assert!(
        (rm[0] - 0.3).abs() < 1e-6 && (rm[1] - 2.5).abs() < 1e-5,
        "{rm:?}"
    );
    assert!((rv[0] - (0.9 + 0.1 * 14.0 / 3.0)).abs() < 1e-5, "{rv:?}");
    assert!((rv[1] - (0.9 + 0.1 * 500.0 / 3.0)).abs() < 1e-3, "{rv:?}");
    assert_eq!(bn.num_batches_tracked.value[0], 1.0);
    let y = bn.forward(&BE, &randn(&mut rng, &[3, 2]), false);
    assert_eq!(bn.num_batches_tracked.value[0], 1.0, "eval must not count");
    assert!(y.data.iter().all(|v| v.is_finite()));
}

impl Checked for Linear {
    fn fwd(&mut self, x: &Tensor) -> Tensor {
        self.forward(&BE, x, true)
    }
    fn bwd(&mut self, dy: &Tensor) -> Tensor {
        self.backward(&BE, dy, true).unwrap()
    }
    fn params(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
        if let Some(b) = &mut self.bias {
            f(b);
        }
    }
}

#[test]
fn linear_gradients() {
    let mut rng = Rng::new(7);
    for bias in [false, true] {
        let lin = Linear::new("fc", 6, 5, bias, &mut rng);
        let x = randn(&mut rng, &[4, 6]);
        grad_check(&format!("linear bias={bias}"), &lin, &x, 30, true, 8);
    }
}

#[derive(Clone, Default)]
struct ReluL(Relu);
impl Checked for ReluL {
    fn fwd(&mut self, x: &Tensor) -> Tensor {
        self.0.forward(x.clone(), true)
    }
    fn bwd(&mut self, dy: &Tensor) -> Tensor {
        self.0.backward(dy.clone())
    }
}

#[derive(Clone, Default)]
struct PoolL(MaxPool);
impl Checked for PoolL {
    fn fwd(&mut self, x: &Tensor) -> Tensor {
        self.0.forward(x, true)
    }
    fn bwd(&mut self, dy: &Tensor) -> Tensor {
        self.0.backward(dy)
    }
}

#[test]
fn relu_and_maxpool_gradients() {
    let mut rng = Rng::new(9);
    // Values kept away from the kinks (|x| > 0.05, distinct maxima) so differences are smooth.
    let mut x = randn(&mut rng, &[2, 3, 7, 6]);
    for (i, v) in x.data.iter_mut().enumerate() {
        *v = v.signum() * (v.abs() + 0.05) + i as f32 * 1e-3;
    }
    grad_check("relu", &ReluL::default(), &x, 40, true, 10);
    grad_check("maxpool", &PoolL::default(), &x, 40, true, 11);
    let y = MaxPool::default().forward(&x, false);
    assert_eq!(y.shape, vec![2, 3, 4, 3]);
}

#[derive(Clone)]
struct Backbone(ResNet);
impl Checked for Backbone {
    fn fwd(&mut self, x: &Tensor) -> Tensor {
        self.0.forward(&BE, x, true)
    }
    fn bwd(&mut self, dy: &Tensor) -> Tensor {
        self.0.backward(&BE, dy);
        Tensor::zeros(&[0])
    }
    fn params(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.0.params_mut(f);
    }
}

/// Random BN scales, so zero-initialized branches carry gradient too; with `positive_bias`, BN
/// shifts large enough that every ReLU is active, which makes the whole network smooth: finite
/// differences of a deep f32 network across ReLU kinks are noise, and the kinks themselves are
/// checked layer by layer above.
fn perturbed(mut net: ResNet, rng: &mut Rng, positive_bias: bool) -> ResNet {
    net.params_mut(&mut |p| {
        if p.name.ends_with(".bias") && positive_bias {
            p.value
                .iter_mut()
                .for_each(|v| *v = 4.0 + rng.uniform() as f32);
        } else if p.is_vector() {
            p.value
                .iter_mut()
                .for_each(|v| *v = 0.5 + rng.uniform() as f32);
        }
    });
    net
}

#[test]
fn resnet_gradients_small_and_imagenet_stems() {
    let mut rng = Rng::new(12);
    for (arch, stem, hw) in [
        (Arch::Resnet18, Stem::Small, 16),
        (Arch::Resnet50, Stem::Small, 16),
        (Arch::Resnet18, Stem::Imagenet, 45),
    ] {
        let cfg = ResNetConfig::new(arch, stem, 2, 4);
        let net = perturbed(ResNet::new(cfg, &mut rng), &mut rng, true);
        let x = randn(&mut rng, &[6, 2, hw, hw]);
        // Max-pool switches its argmax under large steps: a smaller one there.
        let h = if stem == Stem::Imagenet { 1e-3 } else { 1e-2 };
        grad_check_h(
            &format!("{arch:?} {stem:?}"),
            &Backbone(net),
            &x,
            4,
            false,
            13,
            h,
        );
    }
}

#[test]
fn resnet_shapes_and_torchvision_names() {
    let mut rng = Rng::new(14);
    let cfg = ResNetConfig::new(Arch::Resnet50, Stem::Imagenet, 3, 64);
    let mut net = ResNet::new(cfg, &mut rng);
    let mut names = Vec::new();
    let mut count = 0usize;
    net.params_mut(&mut |p| {
        names.push(p.name.clone());
        count += p.value.len();
    });
    // torchvision's resnet50 without fc: 23,508,032 parameters.
    assert_eq!(count, 23_508_032);
    for want in [
        "conv1.weight",
        "bn1.weight",
        "layer1.0.downsample.0.weight",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.bias",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}");
    }
    let mut bufs = Vec::new();
    net.buffers_mut(&mut |b| bufs.push(b.name.clone()));
    assert!(bufs.iter().any(|n| n == "layer3.5.bn2.running_var"));
    assert!(bufs.iter().any(|n| n == "bn1.num_batches_tracked"));

    let cfg18 = ResNetConfig::new(Arch::Resnet18, Stem::Imagenet, 3, 64);
    let mut r18 = ResNet::new(cfg18, &mut rng);
    let mut c18 = 0usize;
    r18.params_mut(&mut |p| c18 += p.value.len());
    // torchvision's resnet18 without fc: 11,176,512 parameters.
    assert_eq!(c18, 11_176_512);
    let y = r18.forward(&BE, &randn(&mut rng, &[2, 3, 32, 32]), false);
    assert_eq!(y.shape, vec![2, 512]);
}

#[derive(Clone)]
struct Proj(Projector);
impl Checked for Proj {
    fn fwd(&mut self, x: &Tensor) -> Tensor {
        self.0.forward(&BE, x, true)
    }
    fn bwd(&mut self, dy: &Tensor) -> Tensor {
        self.0.backward(&BE, dy)
    }
    fn params(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.0.params_mut(f);
    }
}

#[test]
fn projector_gradients_and_names() {
    let mut rng = Rng::new(15);
    let mut p = Projector::new(&[6, 8, 8, 5], &mut rng);
    let mut names = Vec::new();
    p.params_mut(&mut |q| names.push(q.name.clone()));
    assert_eq!(
        names,
        [
            "projector.0.weight",
            "projector.1.weight",
            "projector.1.bias",
            "projector.3.weight",
            "projector.4.weight",
            "projector.4.bias",
            "projector.6.weight"
        ]
    );
    let x = randn(&mut rng, &[6, 6]);
    grad_check("projector", &Proj(p), &x, 20, true, 16);
}

#[test]
fn two_views_through_one_layer_accumulate_like_two_separate_passes() {
    let mut rng = Rng::new(17);
    let cfg = ResNetConfig::new(Arch::Resnet18, Stem::Small, 1, 4);
    let net = perturbed(ResNet::new(cfg, &mut rng), &mut rng, false);
    let (x1, x2) = (
        randn(&mut rng, &[3, 1, 6, 6]),
        randn(&mut rng, &[3, 1, 6, 6]),
    );
    let (r1, r2) = (randn(&mut rng, &[3, 32]), randn(&mut rng, &[3, 32]));
    let grads = |net: &mut ResNet| {
        let mut v = Vec::new();
        net.params_mut(&mut |p| v.extend_from_slice(&p.grad));
        v
    };
    // Both forwards, then both backwards (last in, first out).
    let mut a = net.clone();
    a.forward(&BE, &x1, true);
    a.forward(&BE, &x2, true);
    a.backward(&BE, &r2);
    a.backward(&BE, &r1);
    // Each view on its own, gradients added.
    let mut b = net.clone();
    b.forward(&BE, &x1, true);
    b.backward(&BE, &r1);
    b.forward(&BE, &x2, true);
    b.backward(&BE, &r2);
    let (ga, gb) = (grads(&mut a), grads(&mut b));
    let scale = gb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ga
        .iter()
        .zip(&gb)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale;
    assert!(err < 1e-5, "interleaved views differ: {err}");
}
