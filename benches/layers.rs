//! Criterion benchmarks of the CPU training step's layers, each alone: every distinct convolution
//! of the main job's network (ResNet-18, width 16, small stem, 28×28×3, batch 256), forward and
//! backward (input and weight gradients), and its batch norm forward and backward. Throughput is
//! in floating-point operations (`Gelem/s` reads as GFLOP/s; a norm's count is nominal).
//! `benches/pytorch/layers.py` times the same layers in PyTorch, side by side.
//!
//! `BARLOW_BENCH_BATCH` sets the batch (default 256).

use barlow::nn::graph::{Graph, Op};
use barlow::nn::resnet::{Arch, ResNetConfig, Stem};
use barlow::nn::{Backend, ConvSpec, CpuBackend};
use barlow::rng::Rng;
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use std::time::Duration;

fn batch() -> usize {
    std::env::var("BARLOW_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// The distinct convolutions of the main job's backbone, named after their first layer.
fn convs() -> Vec<(String, ConvSpec)> {
    let g = Graph::resnet(&ResNetConfig::new(Arch::Resnet18, Stem::Small, 3, 16));
    let hw = g.spatial(28, 28).expect("28x28 fits");
    let mut out: Vec<(String, ConvSpec)> = Vec::new();
    for n in &g.nodes {
        if let Op::Conv(c) = n.op {
            let (h, w) = hw[n.x];
            let spec = c.at(h, w);
            if !out.iter().any(|(_, s)| *s == spec) {
                out.push((n.name.clone(), spec));
            }
        }
    }
    out
}

fn randn(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.normal() as f32).collect()
}

/// A group of short measurements (each layer runs for milliseconds).
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

fn conv(c: &mut Criterion) {
    let n = batch();
    let be = CpuBackend;
    let mut rng = Rng::new(1);
    let mut g = group(c, "conv_cpu");
    for (name, s) in convs() {
        let x = randn(&mut rng, n * s.in_c * s.h * s.w);
        let w = randn(&mut rng, s.out_c * s.in_c * s.k * s.k);
        let out = n * s.out_c * s.ho() * s.wo();
        let dy = randn(&mut rng, out);
        let mut y = vec![0f32; out];
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; w.len()];
        let flops = 2 * out * s.in_c * s.k * s.k;
        let id = format!(
            "{name} {}x{} {}->{} k{} s{}",
            s.h, s.w, s.in_c, s.out_c, s.k, s.stride
        );
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter(|| be.conv2d_forward(&s, n, &x, &w, &mut y, None))
        });
        // As in training: the output's per-plane moments for the batch norm, on the way.
        let mut mo = vec![0f32; n * s.out_c * 3];
        g.bench_function(BenchmarkId::new("forward+moments", &id), |b| {
            b.iter(|| be.conv2d_forward(&s, n, &x, &w, &mut y, Some(&mut mo)))
        });
        // The first convolution needs no input gradient (as in training).
        let need_dx = name != "conv1";
        g.throughput(Throughput::Elements(
            (flops * (1 + usize::from(need_dx))) as u64,
        ));
        g.bench_function(BenchmarkId::new("backward", &id), |b| {
            b.iter(|| {
                let dx = need_dx.then_some(dx.as_mut_slice());
                be.conv2d_backward(&s, n, &x, &w, &dy, dx, &mut dw)
            })
        });
    }
    g.finish();
}

fn norm(c: &mut Criterion) {
    let n = batch();
    let be = CpuBackend;
    let mut rng = Rng::new(2);
    let mut g = group(c, "norm_cpu");
    for (ch, side) in [(16, 28), (32, 14), (64, 7), (128, 4)] {
        let hw = side * side;
        let len = n * ch * hw;
        let x = randn(&mut rng, len);
        let gamma = randn(&mut rng, ch);
        let beta = randn(&mut rng, ch);
        let (mut mean, mut var) = (vec![0f32; ch], vec![0f32; ch]);
        let mut y = vec![0f32; len];
        let mut dy = randn(&mut rng, len);
        let mut dx = vec![0f32; len];
        let (mut dg, mut db) = (vec![0f32; ch], vec![0f32; ch]);
        let id = format!("{side}x{side}x{ch}");
        g.throughput(Throughput::Elements(len as u64));
        g.bench_function(BenchmarkId::new("forward+relu", &id), |b| {
            b.iter(|| {
                be.channel_stats(n, ch, hw, &x, None, &mut mean, &mut var);
                let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
                be.norm_apply(
                    n,
                    ch,
                    hw,
                    &x,
                    (&mean, &rstd),
                    (&gamma, &beta),
                    None,
                    true,
                    &mut y,
                );
            })
        });
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        g.bench_function(BenchmarkId::new("backward+relu", &id), |b| {
            b.iter(|| {
                be.batch_norm_backward(
                    n,
                    ch,
                    hw,
                    &x,
                    (&mean, &rstd),
                    &gamma,
                    Some(&y),
                    &mut dy,
                    &mut dx,
                    &mut dg,
                    &mut db,
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, conv, norm);
criterion_main!(benches);
