//! GPU parity of the CUDA trainer: every layer's forward and backward (cuDNN convolutions, batch
//! norm with its fused residual add and ReLU, pooling, linear layers, LARS) against the CPU
//! layers on random inputs of odd shapes with outputs poisoned (NaN) first, in f32 (within 1e-4)
//! and bf16 (within 2e-2); a whole training step against the CPU model; and a short CIFAR-10 run.
//! Without a GPU (or without cuDNN) each test prints `SKIP: <reason>` and returns.
#![cfg(feature = "cli")]

mod common;

use barlow::cuda::cudarc::driver::{CudaSlice, CudaStream};
use barlow::cuda::cudnn::{check_cudnn, AlgoSearch, Convolutions};
use barlow::cuda::nn::{LarsStep, LarsTables, NnOps, NormBackward, NormForward, NormMode};
use barlow::cuda::Act;
use barlow::nn::resnet::{Arch, ResNetConfig, Stem};
use barlow::nn::{Backend, BatchNorm, ConvSpec, CpuBackend, MaxPool, Param, Tensor, Visit};
use barlow::train::cuda::{nchw_to_nhwc, ohwi_to_oihw, oihw_to_ohwi, DeviceOptions, DeviceTrainer};
use barlow::train::{BarlowTwins, Lars, LarsConfig, ModelConfig};
use barlow::Error;
use common::*;
use half::bf16;
use std::sync::Arc;

/// The stream for trainer tests: a GPU with kernels, cuBLAS and cuDNN, or `None` after `SKIP`.
fn gpu_nn(test: &str) -> Option<Arc<CudaStream>> {
    let s = gpu(test)?;
    match check_cudnn() {
        Ok(()) => Some(s),
        Err(e) => {
            if std::env::var("BARLOW_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: BARLOW_REQUIRE_GPU=1 but {e}");
            }
            println!("SKIP: {test}: {e}");
            None
        }
    }
}

/// The math the trainer runs each element type with: FMA only for f32 (its checking mode), tensor
/// cores for bf16.
/// How the convolutions choose algorithms: scripts/test-vgpu.sh runs these tests with cuDNN's
/// timed ranking, then again with `BARLOW_CUDNN_FIND=0` for its heuristic ranking.
fn search() -> AlgoSearch {
    match std::env::var("BARLOW_CUDNN_FIND") {
        Ok(v) if v == "0" => AlgoSearch::Heuristic,
        _ => AlgoSearch::Benchmark,
    }
}

fn options(fma_only: bool) -> DeviceOptions {
    DeviceOptions::default().fma_only(fma_only).cudnn(search())
}

fn fma_only<A: Act>() -> bool {
    A::DTYPE == barlow::cuda::Dtype::F32
}

fn tol<A: Act>() -> f64 {
    if A::DTYPE == barlow::cuda::Dtype::F32 {
        1e-4
    } else {
        2e-2
    }
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Values as the device holds them in `A` (what the CPU reference must start from).
fn round<A: Act>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| A::from_f32(x).to_f32()).collect()
}

fn up<A: Act>(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<A> {
    let h: Vec<A> = v.iter().map(|&x| A::from_f32(x)).collect();
    s.clone_htod(&h).unwrap()
}

fn poisoned<A: Act>(s: &Arc<CudaStream>, n: usize) -> CudaSlice<A> {
    up::<A>(s, &vec![f32::NAN; n])
}

fn down<A: Act>(s: &Arc<CudaStream>, b: &CudaSlice<A>, n: usize) -> Vec<f32> {
    s.clone_dtoh(&b.slice(..n))
        .unwrap()
        .into_iter()
        .map(A::to_f32)
        .collect()
}

fn to_nhwc(x: &[f32], d: (usize, usize, usize, usize)) -> Vec<f32> {
    let mut o = vec![0f32; x.len()];
    nchw_to_nhwc(x, d, &mut o);
    o
}

fn to_nchw(x: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
    let mut o = vec![0f32; x.len()];
    for i in 0..n {
        for p in 0..h * w {
            for ch in 0..c {
                o[(i * c + ch) * h * w + p] = x[(i * h * w + p) * c + ch];
            }
        }
    }
    o
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output (poison left?)"
    );
    assert_close(what, got, &to_f64(want), tol);
}

fn conv_case<A: Act>(s: &Arc<CudaStream>, spec: ConvSpec, n: usize, seed: u64) {
    let what = format!("{:?} conv {spec:?} n={n}", A::DTYPE);
    let mut rng = Rng::new(seed);
    let (ho, wo) = (spec.ho(), spec.wo());
    let x = round::<A>(&randn(&mut rng, n * spec.in_c * spec.h * spec.w));
    let w = round::<A>(&randn(&mut rng, spec.out_c * spec.in_c * spec.k * spec.k));
    let dy = round::<A>(&randn(&mut rng, n * spec.out_c * ho * wo));
    let be = CpuBackend;
    let mut y = vec![0f32; n * spec.out_c * ho * wo];
    be.conv2d_forward(&spec, n, &x, &w, &mut y, None);
    let mut dx = vec![0f32; x.len()];
    let mut dw = vec![0f32; w.len()];
    be.conv2d_backward(&spec, n, &x, &w, &dy, Some(&mut dx), &mut dw);

    let xd = (n, spec.in_c, spec.h, spec.w);
    let yd = (n, spec.out_c, ho, wo);
    let wshape = [spec.out_c, spec.in_c, spec.k, spec.k];
    let mut convs = Convolutions::<A>::new(s, fma_only::<A>(), search()).unwrap();
    let gx = up::<A>(s, &to_nhwc(&x, xd));
    let gw = up::<A>(s, &oihw_to_ohwi(&w, &wshape));
    let gdy = up::<A>(s, &to_nhwc(&dy, yd));
    let mut gy = poisoned::<A>(s, y.len());
    convs.forward(&spec, n, &gx, &gw, &mut gy).unwrap();
    close(
        &format!("{what} forward"),
        &to_nchw(&down(s, &gy, y.len()), yd),
        &y,
        tol::<A>(),
    );
    let mut gdx = poisoned::<A>(s, x.len());
    convs
        .backward_data(&spec, n, &gw, &gdy, &mut gdx, false)
        .unwrap();
    close(
        &format!("{what} backward data"),
        &to_nchw(&down(s, &gdx, x.len()), xd),
        &dx,
        tol::<A>(),
    );
    // Accumulating onto an earlier gradient adds to it.
    let prior = round::<A>(&randn(&mut rng, x.len()));
    let mut gacc = up::<A>(s, &to_nhwc(&prior, xd));
    convs
        .backward_data(&spec, n, &gw, &gdy, &mut gacc, true)
        .unwrap();
    let want: Vec<f32> = prior.iter().zip(&dx).map(|(a, b)| a + b).collect();
    close(
        &format!("{what} backward data, accumulated"),
        &to_nchw(&down(s, &gacc, x.len()), xd),
        &want,
        tol::<A>(),
    );
    let mut gdw = poisoned::<A>(s, w.len());
    convs
        .backward_filter(&spec, n, &gx, &gdy, &mut gdw, false)
        .unwrap();
    close(
        &format!("{what} backward filter"),
        &ohwi_to_oihw(&down(s, &gdw, w.len()), &wshape),
        &dw,
        tol::<A>(),
    );
}

fn conv_specs() -> Vec<(ConvSpec, usize)> {
    let sp = |in_c, out_c, k, stride, pad, h, w| ConvSpec {
        in_c,
        out_c,
        k,
        stride,
        pad,
        h,
        w,
    };
    vec![
        (sp(3, 5, 3, 1, 1, 7, 9), 3),
        (sp(6, 4, 1, 2, 0, 9, 7), 2),
        (sp(3, 8, 7, 2, 3, 13, 11), 2),
        (sp(5, 7, 3, 2, 1, 10, 10), 3),
        (sp(16, 24, 1, 1, 0, 5, 3), 4),
        // The last stage of a small-stem ResNet on 8×8 images: 2×2 to 1×1, then 3×3 on 1×1, where
        // every tap but the centre falls in the padding.
        (sp(16, 32, 3, 2, 1, 2, 2), 6),
        (sp(32, 32, 3, 1, 1, 1, 1), 6),
    ]
}

#[test]
fn convolutions_match_the_cpu_backend() {
    let Some(s) = gpu_nn("convolutions_match_the_cpu_backend") else {
        return;
    };
    for (i, (spec, n)) in conv_specs().into_iter().enumerate() {
        conv_case::<f32>(&s, spec, n, 10 + i as u64);
        conv_case::<bf16>(&s, spec, n, 20 + i as u64);
    }
}

/// y = act(bn(x) + r) and its backward, against the CPU layer composed with the add and ReLU.
fn norm_case<A: Act>(
    s: &Arc<CudaStream>,
    (n, c, h, w): (usize, usize, usize, usize),
    residual: bool,
    relu: bool,
    seed: u64,
) {
    let what = format!(
        "{:?} norm {n}x{c}x{h}x{w} residual={residual} relu={relu}",
        A::DTYPE
    );
    let mut rng = Rng::new(seed);
    let len = n * c * h * w;
    let d = (n, c, h, w);
    // An offset mean and a non-unit scale, so the statistics matter.
    let x = round::<A>(
        &randn(&mut rng, len)
            .iter()
            .map(|v| 3.0 * v + 1.5)
            .collect::<Vec<_>>(),
    );
    let r = round::<A>(&randn(&mut rng, len));
    let dy = round::<A>(&randn(&mut rng, len));
    let gamma = randn(&mut rng, c);
    let beta = randn(&mut rng, c);
    let rmean = randn(&mut rng, c);
    let rvar: Vec<f32> = (0..c).map(|_| 0.5 + rng.uniform() as f32).collect();

    let be = CpuBackend;
    let mut bn = BatchNorm::new("bn", c, 1.0);
    bn.weight.value = gamma.clone();
    bn.bias.value = beta.clone();
    bn.running_mean.value = rmean.clone();
    bn.running_var.value = rvar.clone();
    let xt = Tensor::from_vec(&[n, c, h, w], x.clone());
    let mut y = bn.forward(&be, &xt, true);
    if residual {
        y.data.iter_mut().zip(&r).for_each(|(a, b)| *a += b);
    }
    if relu {
        y.data.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    let g: Vec<f32> = dy
        .iter()
        .zip(&y.data)
        .map(|(&d, &v)| if relu && v <= 0.0 { 0.0 } else { d })
        .collect();
    let dx = bn.backward(&be, &Tensor::from_vec(&[n, c, h, w], g.clone()));

    let m = n * h * w;
    let mut ops = NnOps::new(s).unwrap();
    let gx = up::<A>(s, &to_nhwc(&x, d));
    let gr = up::<A>(s, &to_nhwc(&r, d));
    let gdy = up::<A>(s, &to_nhwc(&dy, d));
    let gb: Vec<f32> = gamma.iter().chain(&beta).copied().collect();
    let ggb = s.clone_htod(&gb).unwrap();
    let run: Vec<f32> = rmean.iter().chain(&rvar).copied().collect();
    let mut grun = s.clone_htod(&run).unwrap();
    let mut stats = s.clone_htod(&vec![f32::NAN; 2 * c]).unwrap();
    let mut gy = poisoned::<A>(s, len);
    ops.batch_norm_forward(
        NormMode::Train { momentum: 0.1 },
        NormForward {
            rows: m,
            c,
            eps: 1e-5,
            relu,
            x: gx.slice(..),
            gb: ggb.slice(..),
            running: grun.slice_mut(..),
            residual: residual.then(|| gr.slice(..)),
            y: gy.slice_mut(..),
            stats: &mut stats,
        },
    )
    .unwrap();
    close(
        &format!("{what} forward"),
        &to_nchw(&down(s, &gy, len), d),
        &y.data,
        tol::<A>(),
    );
    let run_got = s.clone_dtoh(&grun).unwrap();
    close(
        &format!("{what} running mean"),
        &run_got[..c],
        &bn.running_mean.value,
        1e-4,
    );
    close(
        &format!("{what} running var"),
        &run_got[c..],
        &bn.running_var.value,
        1e-4,
    );

    let mut gdx = poisoned::<A>(s, len);
    let mut gdres = poisoned::<A>(s, len);
    let mut gdgb = s.clone_htod(&vec![0f32; 2 * c]).unwrap();
    ops.batch_norm_backward(NormBackward {
        rows: m,
        c,
        dy: gdy.slice(..),
        y: relu.then(|| gy.slice(..)),
        x: gx.slice(..),
        stats: &stats,
        gb: ggb.slice(..),
        dgb: gdgb.slice_mut(..),
        dx: gdx.slice_mut(..),
        dres: residual.then(|| (gdres.slice_mut(..), false)),
    })
    .unwrap();
    close(
        &format!("{what} dx"),
        &to_nchw(&down(s, &gdx, len), d),
        &dx.data,
        tol::<A>(),
    );
    if residual {
        close(
            &format!("{what} d residual"),
            &to_nchw(&down(s, &gdres, len), d),
            &g,
            tol::<A>(),
        );
    }
    let dgb = s.clone_dtoh(&gdgb).unwrap();
    close(
        &format!("{what} dgamma"),
        &dgb[..c],
        &bn.weight.grad,
        tol::<A>(),
    );
    close(
        &format!("{what} dbeta"),
        &dgb[c..],
        &bn.bias.grad,
        tol::<A>(),
    );

    // Evaluation mode: the running statistics, no update.
    let mut ye = bn.forward(&be, &xt, false);
    if residual {
        ye.data.iter_mut().zip(&r).for_each(|(a, b)| *a += b);
    }
    if relu {
        ye.data.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    let mut gye = poisoned::<A>(s, len);
    ops.batch_norm_forward(
        NormMode::Eval,
        NormForward {
            rows: m,
            c,
            eps: 1e-5,
            relu,
            x: gx.slice(..),
            gb: ggb.slice(..),
            running: grun.slice_mut(..),
            residual: residual.then(|| gr.slice(..)),
            y: gye.slice_mut(..),
            stats: &mut stats,
        },
    )
    .unwrap();
    close(
        &format!("{what} eval forward"),
        &to_nchw(&down(s, &gye, len), d),
        &ye.data,
        tol::<A>(),
    );
    assert_eq!(
        s.clone_dtoh(&grun).unwrap(),
        run_got,
        "{what}: eval moved the running statistics"
    );
}

#[test]
fn batch_norm_with_residual_and_relu_matches_the_cpu_layer() {
    let Some(s) = gpu_nn("batch_norm_with_residual_and_relu_matches_the_cpu_layer") else {
        return;
    };
    let shapes = [(3, 5, 4, 3), (7, 33, 1, 1), (2, 70, 9, 9), (8, 3, 40, 40)];
    let mut seed = 100;
    for &d in &shapes {
        for (residual, relu) in [(false, false), (false, true), (true, true)] {
            norm_case::<f32>(&s, d, residual, relu, seed);
            norm_case::<bf16>(&s, d, residual, relu, seed + 1);
            seed += 2;
        }
    }
}

/// The projector's norm: the standardization kernel's affine variant against the CPU layer.
fn dense_norm_case<A: Act>(s: &Arc<CudaStream>, (n, c): (usize, usize), relu: bool, seed: u64) {
    let what = format!("{:?} projector norm {n}x{c} relu={relu}", A::DTYPE);
    let mut rng = Rng::new(seed);
    // A large offset: the loss's kernel keeps the mean as an f32 pair, so it stays exact.
    let x = round::<A>(
        &randn(&mut rng, n * c)
            .iter()
            .map(|v| 2.0 * v - 7.0)
            .collect::<Vec<_>>(),
    );
    let dy = round::<A>(&randn(&mut rng, n * c));
    let gamma = randn(&mut rng, c);
    let beta = randn(&mut rng, c);
    let be = CpuBackend;
    let mut bn = BatchNorm::new("bn", c, 1.0);
    bn.weight.value = gamma.clone();
    bn.bias.value = beta.clone();
    let xt = Tensor::from_vec(&[n, c], x.clone());
    let y = if relu {
        bn.forward_relu(&be, &xt, true)
    } else {
        bn.forward(&be, &xt, true)
    };
    let dyt = Tensor::from_vec(&[n, c], dy.clone());
    let dx = if relu {
        bn.backward_relu(&be, &dyt)
    } else {
        bn.backward(&be, &dyt)
    };

    let ops = NnOps::new(s).unwrap();
    let gx = up::<A>(s, &x);
    let gdy = up::<A>(s, &dy);
    let gb: Vec<f32> = gamma.iter().chain(&beta).copied().collect();
    let ggb = s.clone_htod(&gb).unwrap();
    let mut grun = s
        .clone_htod(&[vec![0f32; c], vec![1f32; c]].concat())
        .unwrap();
    let mut stats = s.clone_htod(&vec![f32::NAN; 3 * c]).unwrap();
    let mut gy = poisoned::<A>(s, n * c);
    let args = NormForward {
        rows: n,
        c,
        eps: 1e-5,
        relu,
        x: gx.slice(..),
        gb: ggb.slice(..),
        running: grun.slice_mut(..),
        residual: None,
        y: gy.slice_mut(..),
        stats: &mut stats,
    };
    ops.standardize_affine_forward(0.1, args).unwrap();
    close(
        &format!("{what} forward"),
        &down(s, &gy, n * c),
        &y.data,
        tol::<A>(),
    );
    let run = s.clone_dtoh(&grun).unwrap();
    close(
        &format!("{what} running mean"),
        &run[..c],
        &bn.running_mean.value,
        1e-4,
    );
    close(
        &format!("{what} running var"),
        &run[c..],
        &bn.running_var.value,
        1e-4,
    );
    let mut gdx = poisoned::<A>(s, n * c);
    let mut gdgb = s.clone_htod(&vec![0f32; 2 * c]).unwrap();
    ops.standardize_affine_backward(NormBackward {
        rows: n,
        c,
        dy: gdy.slice(..),
        y: relu.then(|| gy.slice(..)),
        x: gx.slice(..),
        stats: &stats,
        gb: ggb.slice(..),
        dgb: gdgb.slice_mut(..),
        dx: gdx.slice_mut(..),
        dres: None,
    })
    .unwrap();
    // dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂)) cancels far below its terms when N is small
    // (N = 2: every x̂ is ±1 and dx is rounding noise), so it is measured against their scale.
    let rstd = (0..c).map(|j| {
        let col = (0..n).map(|i| f64::from(x[i * c + j]));
        let mean = col.clone().sum::<f64>() / n as f64;
        let var = col.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        (f64::from(gamma[j]) / (var + 1e-5).sqrt()).abs()
    });
    let scale = grad_scale(&rstd.collect::<Vec<_>>(), &to_f64(&dy));
    assert_close_grad(
        &format!("{what} dx"),
        &down(s, &gdx, n * c),
        &to_f64(&dx.data),
        scale,
        tol::<A>(),
    );
    let dgb = s.clone_dtoh(&gdgb).unwrap();
    close(
        &format!("{what} dgamma"),
        &dgb[..c],
        &bn.weight.grad,
        tol::<A>(),
    );
    close(
        &format!("{what} dbeta"),
        &dgb[c..],
        &bn.bias.grad,
        tol::<A>(),
    );
}

#[test]
fn projector_norm_on_the_standardization_kernel_matches_the_cpu_layer() {
    let Some(s) = gpu_nn("projector_norm_on_the_standardization_kernel_matches_the_cpu_layer")
    else {
        return;
    };
    let mut seed = 700;
    for &d in &[(2, 5), (7, 33), (300, 70), (64, 1000)] {
        for relu in [false, true] {
            dense_norm_case::<f32>(&s, d, relu, seed);
            dense_norm_case::<bf16>(&s, d, relu, seed + 1);
            seed += 2;
        }
    }
}

fn pool_case<A: Act>(s: &Arc<CudaStream>, (n, c, h, w): (usize, usize, usize, usize), seed: u64) {
    let what = format!("{:?} pools {n}x{c}x{h}x{w}", A::DTYPE);
    let mut rng = Rng::new(seed);
    let d = (n, c, h, w);
    let x = round::<A>(&randn(&mut rng, n * c * h * w));
    let mut mp = MaxPool::default();
    let y = mp.forward(&Tensor::from_vec(&[n, c, h, w], x.clone()), true);
    let (ho, wo) = (y.shape[2], y.shape[3]);
    let yd = (n, c, ho, wo);
    let dy = round::<A>(&randn(&mut rng, y.len()));
    let dx = mp.backward(&Tensor::from_vec(&[n, c, ho, wo], dy.clone()));

    let ops = NnOps::new(s).unwrap();
    let gx = up::<A>(s, &to_nhwc(&x, d));
    let mut gy = poisoned::<A>(s, y.len());
    let mut arg = s.clone_htod(&vec![255u8; y.len()]).unwrap();
    ops.max_pool_forward(
        (n, h, w, c),
        &gx.slice(..),
        &mut gy.slice_mut(..),
        &mut arg.slice_mut(..),
    )
    .unwrap();
    close(
        &format!("{what} max forward"),
        &to_nchw(&down(s, &gy, y.len()), yd),
        &y.data,
        tol::<A>(),
    );
    let gdy = up::<A>(s, &to_nhwc(&dy, yd));
    let mut gdx = poisoned::<A>(s, x.len());
    ops.max_pool_backward(
        (n, h, w, c),
        &gdy.slice(..),
        &arg.slice(..),
        &mut gdx.slice_mut(..),
    )
    .unwrap();
    close(
        &format!("{what} max backward"),
        &to_nchw(&down(s, &gdx, x.len()), d),
        &dx.data,
        tol::<A>(),
    );

    // Global average pool: reference sums in f64.
    let hw = h * w;
    let avg: Vec<f32> = (0..n * c)
        .map(|i| {
            (x[i * hw..(i + 1) * hw]
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>()
                / hw as f64) as f32
        })
        .collect();
    let mut ga = poisoned::<A>(s, n * c);
    ops.avg_pool_forward((n, hw, c), &gx.slice(..), &mut ga.slice_mut(..))
        .unwrap();
    close(
        &format!("{what} avg forward"),
        &down(s, &ga, n * c),
        &avg,
        tol::<A>(),
    );
    let dyp = round::<A>(&randn(&mut rng, n * c));
    let want: Vec<f32> = (0..n * c * hw).map(|i| dyp[i / hw] / hw as f32).collect();
    let gdyp = up::<A>(s, &dyp);
    let mut gdxp = poisoned::<A>(s, x.len());
    ops.avg_pool_backward((n, hw, c), &gdyp.slice(..), &mut gdxp.slice_mut(..))
        .unwrap();
    close(
        &format!("{what} avg backward"),
        &to_nchw(&down(s, &gdxp, x.len()), d),
        &want,
        tol::<A>(),
    );
}

#[test]
fn pooling_matches_the_cpu_layers() {
    let Some(s) = gpu_nn("pooling_matches_the_cpu_layers") else {
        return;
    };
    for (i, &d) in [(2, 3, 7, 9), (3, 5, 8, 8), (1, 2, 1, 1), (2, 17, 13, 6)]
        .iter()
        .enumerate()
    {
        pool_case::<f32>(&s, d, 200 + i as u64);
        pool_case::<bf16>(&s, d, 300 + i as u64);
    }
}

fn linear_case<A: Act>(s: &Arc<CudaStream>, (n, inp, out): (usize, usize, usize), seed: u64) {
    let what = format!("{:?} linear {n}x{inp}->{out}", A::DTYPE);
    let mut rng = Rng::new(seed);
    let x = round::<A>(&randn(&mut rng, n * inp));
    let w = round::<A>(&randn(&mut rng, out * inp));
    let dy = round::<A>(&randn(&mut rng, n * out));
    let prior = randn(&mut rng, out * inp);
    let be = CpuBackend;
    let mut y = vec![0f32; n * out];
    be.linear_forward(n, &x, &w, None, &mut y, out);
    let mut dx = vec![0f32; n * inp];
    let mut dw = prior.clone();
    be.linear_backward(n, &x, &w, &dy, out, Some(&mut dx), &mut dw, None);

    let mut ops = NnOps::new(s).unwrap();
    let (gx, gw, gdy) = (up::<A>(s, &x), up::<A>(s, &w), up::<A>(s, &dy));
    let mut gy = poisoned::<A>(s, n * out);
    ops.linear_forward(
        fma_only::<A>(),
        (n, inp, out),
        &gx.slice(..),
        &gw.slice(..),
        &mut gy.slice_mut(..),
    )
    .unwrap();
    close(
        &format!("{what} forward"),
        &down(s, &gy, n * out),
        &y,
        tol::<A>(),
    );
    let mut gdw = s.clone_htod(&prior).unwrap();
    let mut gdx = poisoned::<A>(s, n * inp);
    let mut dxv = gdx.slice_mut(..);
    ops.linear_backward(
        fma_only::<A>(),
        (n, inp, out),
        &gx.slice(..),
        &gw.slice(..),
        &gdy.slice(..),
        &mut gdw.slice_mut(..),
        Some((&mut dxv, false)),
    )
    .unwrap();
    close(
        &format!("{what} dx"),
        &down(s, &gdx, n * inp),
        &dx,
        tol::<A>(),
    );
    close(
        &format!("{what} dw (accumulated onto an earlier gradient)"),
        &s.clone_dtoh(&gdw).unwrap(),
        &dw,
        tol::<A>(),
    );
}

#[test]
fn linear_layers_match_the_cpu_backend() {
    let Some(s) = gpu_nn("linear_layers_match_the_cpu_backend") else {
        return;
    };
    for (i, &d) in [(5, 7, 3), (33, 65, 17), (2, 1, 9)].iter().enumerate() {
        linear_case::<f32>(&s, d, 400 + i as u64);
        linear_case::<bf16>(&s, d, 500 + i as u64);
    }
}

struct Params(Vec<Param>);
impl Visit for Params {
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.0.iter_mut().for_each(f);
    }
    fn buffers_mut(&mut self, _: &mut dyn FnMut(&mut barlow::nn::Buffer)) {}
}

#[test]
fn lars_matches_the_cpu_optimizer() {
    let Some(s) = gpu_nn("lars_matches_the_cpu_optimizer") else {
        return;
    };
    let mut rng = Rng::new(600);
    // A tensor spanning several chunks, a 1-D one spanning two, small ones, and a zero one.
    let shapes: Vec<Vec<usize>> = vec![
        vec![300, 300],
        vec![17],
        vec![5, 3, 3, 3],
        vec![70_000],
        vec![4, 4],
    ];
    let mut params = Params(
        shapes
            .iter()
            .enumerate()
            .map(|(i, sh)| {
                let n: usize = sh.iter().product();
                let v = if i == 4 {
                    vec![0.0; n]
                } else {
                    randn(&mut rng, n)
                };
                Param::new(format!("p{i}"), sh, v)
            })
            .collect(),
    );
    let cfg = LarsConfig::default();
    let mut lars = Lars::new(cfg);
    let mut tensors = Vec::new();
    let mut flat = Vec::new();
    for p in &params.0 {
        tensors.push((flat.len(), p.value.len(), p.is_vector()));
        flat.extend_from_slice(&p.value);
    }
    let total = flat.len();
    let ops = NnOps::new(&s).unwrap();
    let mut table = LarsTables::new(&s, &tensors, total).unwrap();
    let mut w = s.clone_htod(&flat).unwrap();
    let mut mom = s.clone_htod(&vec![0f32; total]).unwrap();
    let mut work = poisoned::<f32>(&s, total);
    let mut work16 = poisoned::<bf16>(&s, total);
    for step in 0..3 {
        let mut g = Vec::new();
        for p in &mut params.0 {
            p.grad = randn(&mut rng, p.value.len());
            g.extend_from_slice(&p.grad);
        }
        let (lw, lb) = (0.2 + 0.1 * step as f32, 0.005);
        lars.step(&mut params, lw, lb);
        let gg = s.clone_htod(&g).unwrap();
        let hp = LarsStep {
            weight_decay: cfg.weight_decay,
            eta: cfg.eta,
            momentum: cfg.momentum,
            lr_weights: lw,
            lr_biases: lb,
        };
        table
            .step::<f32>(&ops, hp, &mut w, &gg, &mut mom, &mut work)
            .unwrap();
        let got = s.clone_dtoh(&w).unwrap();
        let want: Vec<f32> = params.0.iter().flat_map(|p| p.value.clone()).collect();
        close(&format!("LARS step {step} weights"), &got, &want, 1e-5);
        let mom_want: Vec<f32> = lars.momentum.iter().flat_map(|(_, v)| v.clone()).collect();
        close(
            &format!("LARS step {step} momentum"),
            &s.clone_dtoh(&mom).unwrap(),
            &mom_want,
            1e-5,
        );
        assert_eq!(s.clone_dtoh(&work).unwrap(), got, "f32 working copy");
    }
    // The bf16 working copy is the rounded master copy.
    let g = s.clone_htod(&vec![0f32; total]).unwrap();
    let hp = LarsStep {
        weight_decay: 0.0,
        eta: cfg.eta,
        momentum: 0.0,
        lr_weights: 0.0,
        lr_biases: 0.0,
    };
    table
        .step::<bf16>(&ops, hp, &mut w, &g, &mut mom, &mut work16)
        .unwrap();
    let master = s.clone_dtoh(&w).unwrap();
    let w16 = down(&s, &work16, total);
    assert_eq!(w16, round::<bf16>(&master), "bf16 working copy");
}

fn tiny_model(arch: Arch, stem: Stem, width: usize, projector: Vec<usize>) -> BarlowTwins {
    let cfg = ModelConfig::new(ResNetConfig::new(arch, stem, 3, width), projector).lambda(0.0051);
    let mut m = BarlowTwins::new(cfg, &mut Rng::new(77)).unwrap();
    // Norm parameters away from their initial 1 and 0: every residual branch then carries a
    // gradient from the first step (zero-initialized last norms would block it), and no ReLU
    // input sits exactly on the kink, where a constant channel (x̂ = 0, β = 0) would let rounding
    // of the mean alone decide which side of the kink it falls on.
    let mut rng = Rng::new(78);
    m.params_mut(&mut |p| {
        if p.is_vector() {
            let (base, spread) = if p.name.ends_with(".weight") {
                (1.0, 0.3)
            } else {
                (0.0, 0.3)
            };
            p.value
                .iter_mut()
                .for_each(|v| *v = base + spread * rng.normal() as f32);
        }
    });
    m
}

/// Multiplies each value by 1 + u·2⁻²² (u uniform in [−1, 1]): a change at the level of f32
/// rounding.
fn jitter(rng: &mut Rng, v: &mut [f32]) {
    for x in v {
        *x *= 1.0 + (2.0 * rng.uniform() as f32 - 1.0) * f32::EPSILON * 0.5;
    }
}

/// The error allowed for a device result that differs from the CPU's by rounding alone
/// (summation order, FMA contraction): fifty times the CPU's own change when its inputs and
/// weights move by a rounding error (`spread`), at least 1e-4. The factor: the jitter puts half
/// an ulp on the inputs of the first layer only, while the device rounds differently in every
/// one of L layers, each summing K products in another order (about √(K·L) ulps, 30 to 70 for
/// these networks). Well-conditioned results are held to 1e-4; results that amplify rounding
/// (small batches through batch norm) get the room their conditioning implies, and a wrong result
/// (a swapped operand, a missed term) still far exceeds it.
fn allowed(spread: f64) -> f64 {
    (50.0 * spread).max(1e-4)
}

/// Copies parameters and buffers of `from` into `to`.
fn copy_state(from: &mut BarlowTwins, to: &mut BarlowTwins) {
    let mut v = Vec::new();
    from.params_mut(&mut |p| v.push(p.value.clone()));
    from.buffers_mut(&mut |b| v.push(b.value.clone()));
    let mut it = v.into_iter();
    to.params_mut(&mut |p| p.value = it.next().unwrap());
    to.buffers_mut(&mut |b| b.value = it.next().unwrap());
}

/// Whole training steps on the device against the CPU model. Every step starts both from the
/// device's state (weights, statistics, momentum): a step at a real learning rate turns a 1e-5
/// difference in the weights into a far larger one in the next gradients, so comparing two
/// trajectories would measure how chaotic the tiny network is, not the device. A third model,
/// started from the same state with weights and inputs moved by a rounding error, gives each
/// result's conditioning.
fn step_case(
    test: &str,
    arch: Arch,
    stem: Stem,
    width: usize,
    n: usize,
    hw: usize,
    proj: Vec<usize>,
) {
    let Some(s) = gpu_nn(test) else {
        return;
    };
    let what = format!("{arch:?} {stem:?} width {width} batch {n} {hw}x{hw}");
    let mut cpu = tiny_model(arch, stem, width, proj.clone());
    let mut cpu_p = tiny_model(arch, stem, width, proj.clone());
    let mut dev = tiny_model(arch, stem, width, proj);
    let mut jr = Rng::new(13);
    let mut rng = Rng::new(9);
    let views = |rng: &mut Rng| {
        (
            Tensor::from_vec(&[n, 3, hw, hw], randn(rng, n * 3 * hw * hw)),
            Tensor::from_vec(&[n, 3, hw, hw], randn(rng, n * 3 * hw * hw)),
        )
    };
    let jittered = |jr: &mut Rng, t: &Tensor| {
        let mut t = t.clone();
        jitter(jr, &mut t.data);
        t
    };
    let grads = |m: &mut BarlowTwins| {
        let mut g = Vec::new();
        m.params_mut(&mut |p| g.push((p.name.clone(), p.grad.clone())));
        g
    };
    let values = |m: &mut BarlowTwins| {
        let mut v = Vec::new();
        m.params_mut(&mut |p| v.push((p.name.clone(), p.value.clone())));
        m.buffers_mut(&mut |b| v.push((b.name.clone(), b.value.clone())));
        v
    };
    let mut opt_dev = Lars::new(LarsConfig::default());
    let mut t =
        DeviceTrainer::<f32>::new(&s, &mut dev, &opt_dev, n, (3, hw, hw), options(true)).unwrap();
    for step in 0..2 {
        t.sync_to_host(&mut dev, &mut opt_dev).unwrap();
        copy_state(&mut dev, &mut cpu);
        copy_state(&mut dev, &mut cpu_p);
        cpu_p.params_mut(&mut |p| jitter(&mut jr, &mut p.value));
        let (mut opt_cpu, mut opt_cpu_p) = (opt_dev.clone(), opt_dev.clone());

        let (a, b) = views(&mut rng);
        let want = cpu.forward_backward(&CpuBackend, &a, &b).unwrap();
        let (ap, bp) = (jittered(&mut jr, &a), jittered(&mut jr, &b));
        let want_p = cpu_p.forward_backward(&CpuBackend, &ap, &bp).unwrap();
        t.stage(&a, &b).unwrap();
        let got = t.forward_backward().unwrap();
        assert_close_scalar(
            &format!("{what} step {step} loss"),
            got.total,
            want.total,
            allowed(rel_err_scalar(want_p.total, want.total)),
        );
        t.gradients_to_host(&mut dev).unwrap();
        let (want_g, want_gp) = (grads(&mut cpu), grads(&mut cpu_p));
        let top = want_g
            .iter()
            .flat_map(|(_, g)| g.iter())
            .fold(0f32, |m, v| m.max(v.abs()));
        // Normwise per tensor, floored at 1% of the largest gradient anywhere: tensors whose
        // gradient cancels to nearly nothing are held to the scale of the others.
        let floor = 0.01 * f64::from(top);
        // Every tensor's error is reported when one fails: where they start tells the layer.
        let mut report = Vec::new();
        let mut failed = false;
        for (i, (name, g)) in grads(&mut dev).iter().enumerate() {
            assert_eq!(name, &want_g[i].0);
            let want = to_f64(&want_g[i].1);
            let spread = rel_err_scaled(&want_gp[i].1, &want, floor);
            let e = rel_err_scaled(g, &want, floor);
            failed |= e > allowed(spread);
            report.push(format!(
                "{}{name}: error {e:.3e}, allowed {:.3e} (the CPU's own spread under \
                 rounding-level changes: {spread:.3e})",
                if e > allowed(spread) {
                    "FAIL "
                } else {
                    "     "
                },
                allowed(spread)
            ));
        }
        assert!(
            !failed,
            "{what} step {step}: gradients off\n{}",
            report.join("\n")
        );

        let (lw, lb) = (0.3, 0.01);
        opt_cpu.step(&mut cpu, lw, lb);
        opt_cpu_p.step(&mut cpu_p, lw, lb);
        t.optimizer_step(lw, lb).unwrap();
        t.sync_to_host(&mut dev, &mut opt_dev).unwrap();
        let (want_w, want_wp) = (values(&mut cpu), values(&mut cpu_p));
        for (i, (name, got)) in values(&mut dev).iter().enumerate() {
            let spread = rel_err(&want_wp[i].1, &to_f64(&want_w[i].1));
            close(
                &format!("{what} step {step}: {name} after the update"),
                got,
                &want_w[i].1,
                allowed(spread),
            );
        }
    }
    copy_state(&mut dev, &mut cpu);
    copy_state(&mut dev, &mut cpu_p);
    cpu_p.params_mut(&mut |p| jitter(&mut jr, &mut p.value));
    let (a, _) = views(&mut rng);
    let fw = cpu.features(&CpuBackend, &a);
    let fp = cpu_p.features(&CpuBackend, &jittered(&mut jr, &a));
    let fg = t.features(&a).unwrap();
    assert_eq!(fg.shape, fw.shape);
    close(
        &format!("{what}: eval features"),
        &fg.data,
        &fw.data,
        allowed(rel_err(&fp.data, &to_f64(&fw.data))),
    );
}

#[test]
fn whole_step_matches_the_cpu_model_resnet18_small_stem() {
    step_case(
        "whole_step_matches_the_cpu_model_resnet18_small_stem",
        Arch::Resnet18,
        Stem::Small,
        4,
        6,
        8,
        vec![16, 16, 16],
    );
}

#[test]
fn whole_step_matches_the_cpu_model_resnet50_imagenet_stem() {
    step_case(
        "whole_step_matches_the_cpu_model_resnet50_imagenet_stem",
        Arch::Resnet50,
        Stem::Imagenet,
        2,
        4,
        33,
        vec![24, 16, 8],
    );
}

#[test]
fn bf16_step_tracks_the_cpu_loss() {
    let Some(s) = gpu_nn("bf16_step_tracks_the_cpu_loss") else {
        return;
    };
    let (n, hw) = (16, 8);
    let mut cpu = tiny_model(Arch::Resnet18, Stem::Small, 8, vec![32, 32, 32]);
    let mut dev = tiny_model(Arch::Resnet18, Stem::Small, 8, vec![32, 32, 32]);
    let mut rng = Rng::new(10);
    let a = Tensor::from_vec(&[n, 3, hw, hw], randn(&mut rng, n * 3 * hw * hw));
    let b = Tensor::from_vec(&[n, 3, hw, hw], randn(&mut rng, n * 3 * hw * hw));
    let want = cpu.forward_backward(&CpuBackend, &a, &b).unwrap();
    let opt = Lars::new(LarsConfig::default());
    let mut t =
        DeviceTrainer::<bf16>::new(&s, &mut dev, &opt, n, (3, hw, hw), options(false)).unwrap();
    t.stage(&a, &b).unwrap();
    let got = t.forward_backward().unwrap();
    assert_close_scalar("bf16 step loss", got.total, want.total, 5e-2);
}

#[test]
fn trainer_rejects_bad_input_with_typed_errors() {
    let Some(s) = gpu_nn("trainer_rejects_bad_input_with_typed_errors") else {
        return;
    };
    let mut m = tiny_model(Arch::Resnet18, Stem::Small, 4, vec![8, 8, 8]);
    let opt = Lars::new(LarsConfig::default());
    assert!(matches!(
        DeviceTrainer::<f32>::new(&s, &mut m, &opt, 1, (3, 8, 8), options(true)),
        Err(Error::BatchTooSmall { n: 1 })
    ));
    assert!(matches!(
        DeviceTrainer::<f32>::new(&s, &mut m, &opt, 4, (1, 8, 8), options(true)),
        Err(Error::InvalidConfig(_))
    ));
    let mut t = DeviceTrainer::<f32>::new(&s, &mut m, &opt, 4, (3, 8, 8), options(true)).unwrap();
    assert!(matches!(t.forward_backward(), Err(Error::InvalidConfig(_))));
    let good = Tensor::from_vec(&[4, 3, 8, 8], vec![0.5; 4 * 3 * 64]);
    let wrong = Tensor::from_vec(&[4, 3, 8, 7], vec![0.5; 4 * 3 * 56]);
    assert!(matches!(
        t.stage(&good, &wrong),
        Err(Error::InvalidConfig(_))
    ));
    let mut nan = good.clone();
    nan.data[5] = f32::NAN;
    assert!(matches!(t.stage(&nan, &good), Err(Error::InvalidConfig(_))));
    assert!(matches!(t.features(&wrong), Err(Error::InvalidConfig(_))));
    let short = Tensor {
        shape: vec![4, 3, 8, 8],
        data: vec![0.5; 10],
    };
    assert!(matches!(
        t.stage(&short, &good),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(t.features(&short), Err(Error::InvalidConfig(_))));
}

fn cifar_dir() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var("BARLOW_CIFAR10_TGZ").ok(),
        Some(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/data/cifar10-jpg.tar.gz"
            )
            .into(),
        ),
        Some("../shared/data/cifar10-jpg.tar.gz".into()),
    ];
    let tarball = candidates
        .into_iter()
        .flatten()
        .find(|p| std::path::Path::new(p).is_file())?;
    let dir = std::env::temp_dir().join("barlow-cifar10");
    if !dir.join("cifar10/test").is_dir() {
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("tar")
            .args(["xzf", &tarball, "-C"])
            .arg(&dir)
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
    }
    Some(dir.join("cifar10"))
}

/// A short training run through the whole CUDA path (data thread, uploads, steps, kNN,
/// checkpoint). On a GPU: 400 steps on CIFAR-10 must raise the kNN accuracy clearly. On the
/// virtual device, where that would take hours, four steps on the built-in sample check that the
/// run completes; whether it learns is a real GPU's to show.
#[test]
fn short_run_trains_on_the_device() {
    let Some(s) = gpu_nn("short_run_trains_on_the_device") else {
        return;
    };
    use barlow::train::run::{self, DeviceChoice, Precision, Quiet, TrainConfig};
    if barlow::cuda::is_virtual(s.context()) {
        let cfg = TrainConfig::default()
            .data("builtin".into())
            .arch(Arch::Resnet18)
            .stem(Some(Stem::Small))
            .width(8)
            .projector(vec![64, 64, 64])
            .batch_size(32)
            .epochs(1)
            .max_train(128)
            .knn_every(0)
            .knn_bank(256)
            .knn_test(64)
            .device(DeviceChoice::Cuda)
            .precision(Precision::Bf16)
            .cudnn(search());
        let out = std::env::temp_dir().join("barlow-vgpu-run");
        let _ = std::fs::remove_dir_all(&out);
        let r = run::train(&cfg, &out, None, &mut Quiet).unwrap();
        println!(
            "virtual device: {} steps, loss {:.3}, kNN {:.2}% -> {:.2}% (learning is checked on a GPU)",
            r.steps,
            r.final_loss,
            100.0 * r.knn_initial,
            100.0 * r.knn_final
        );
        assert_eq!(r.steps, 4);
        assert!(r.final_loss.is_finite());
        assert!(out.join("checkpoint.safetensors").is_file());
        return;
    }
    let Some(data) = cifar_dir() else {
        let why = "CIFAR-10 tarball not found (set BARLOW_CIFAR10_TGZ)";
        if std::env::var("BARLOW_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("short_run_trains_on_the_device: BARLOW_REQUIRE_GPU=1 but {why}");
        }
        println!("SKIP: short_run_trains_on_the_device: {why}");
        return;
    };
    let cfg = TrainConfig::default()
        .data(data.to_path_buf())
        .arch(Arch::Resnet18)
        .stem(Some(Stem::Small))
        .width(32)
        .projector(vec![1024, 1024, 1024])
        .batch_size(256)
        .epochs(4)
        .max_train(25_600)
        .knn_every(0)
        .knn_bank(10_000)
        .knn_test(2_000)
        .device(DeviceChoice::Cuda)
        .precision(Precision::Bf16)
        .cudnn(search());
    let out = std::env::temp_dir().join("barlow-gpu-cifar-run");
    let _ = std::fs::remove_dir_all(&out);
    let s = run::train(&cfg, &out, None, &mut Quiet).unwrap();
    println!(
        "CIFAR-10 GPU run: {} steps, kNN top-1 {:.2}% -> {:.2}%, {:.0} pairs/s",
        s.steps,
        100.0 * s.knn_initial,
        100.0 * s.knn_final,
        s.images_per_second
    );
    assert_eq!(s.steps, 400);
    assert!(s.final_loss.is_finite());
    assert!(
        s.knn_final > s.knn_initial + 0.05,
        "kNN {:.3} -> {:.3}: no clear gain over random init",
        s.knn_initial,
        s.knn_final
    );
}
