//! Criterion benchmarks of the loss's forward+backward.
//!
//! * `loss_cpu/{direct,gram}`: the CPU path by each computation (runs everywhere).
//! * `loss_cuda/{barlow,naive,cublas-gemm}/{f32,tf32,bf16}`: the fused loss, the naive port of the
//!   reference code and one plain GEMM of C's shape, timed with CUDA events; skipped without a GPU.
//!
//! `BARLOW_BENCH_FULL=1` widens the grids to the paper's and beyond (N up to 4096, D up to 16384).
//! On the virtual CUDA device (`scripts/test-vgpu.sh`) the CUDA groups run one tiny odd shape: it
//! checks that they run, and its times are not GPU figures.
//! `barlow bench loss` prints the same measurements as one table with work, floor and memory.

use barlow::bench::time_gpu;
use barlow::cuda::cudarc::driver::{CudaSlice, CudaStream};
use barlow::cuda::naive::NaiveLoss;
use barlow::cuda::ops::CudaOps;
use barlow::rng::Rng;
use barlow::{BarlowTwinsLoss, Dims, LossConfig, LossPath, Math};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::Arc;
use std::time::Duration;

fn full() -> bool {
    std::env::var("BARLOW_BENCH_FULL").is_ok_and(|v| v == "1")
}

fn cpu(c: &mut Criterion) {
    let shapes: &[(usize, usize)] = if full() {
        &[
            (256, 256),
            (256, 1024),
            (1024, 1024),
            (256, 2048),
            (1024, 2048),
        ]
    } else {
        &[(256, 256), (256, 1024), (1024, 1024)]
    };
    let mut g = c.benchmark_group("loss_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for &(n, d) in shapes {
        let dims = Dims::new(n, d);
        let mut rng = Rng::new(0);
        let za = rng.matrix(n, d);
        let zb = rng.correlated(&za, 0.5);
        let (mut a, mut b) = (vec![0f32; n * d], vec![0f32; n * d]);
        g.throughput(Throughput::Elements((6 * n * d * d) as u64));
        for (name, path) in [("direct", LossPath::Direct), ("gram", LossPath::Gram)] {
            let loss = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
            g.bench_function(BenchmarkId::new(name, format!("N{n}_D{d}")), |bch| {
                bch.iter(|| {
                    loss.forward_backward_cpu(&za, &zb, dims, &mut a, &mut b)
                        .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn stream() -> Option<Arc<CudaStream>> {
    match barlow::cuda::check_available().and_then(|_| barlow::cuda::open_stream(0)) {
        Ok(s) => Some(s),
        Err(e) => {
            println!("SKIP: loss_cuda benchmarks: {e}");
            None
        }
    }
}

/// Criterion's per-iteration time from CUDA events over `iters` calls.
fn gpu_iter(s: &Arc<CudaStream>, iters: u64, mut f: impl FnMut()) -> Duration {
    let t = time_gpu(s, 0, 1, || {
        for _ in 0..iters {
            f();
        }
        Ok(())
    })
    .unwrap();
    Duration::from_secs_f64(t.median_ms * 1e-3)
}

fn cuda(c: &mut Criterion) {
    let Some(s) = stream() else { return };
    let shapes: Vec<(usize, usize)> = if barlow::cuda::is_virtual(s.context()) {
        println!("loss_cuda on the virtual CUDA device: one tiny shape; times are not GPU figures");
        vec![(33, 65)]
    } else if full() {
        [256, 512, 1024, 2048, 4096]
            .iter()
            .flat_map(|&n| [1024, 2048, 4096, 8192, 16384].map(|d| (n, d)))
            .collect()
    } else {
        vec![(256, 1024), (2048, 2048), (2048, 8192)]
    };
    for math in [Math::F32, Math::Tf32, Math::Bf16] {
        let name = barlow::bench::math_name(math);
        let mut g = c.benchmark_group(format!("loss_cuda_{name}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(500));
        for &(n, d) in &shapes {
            let dims = Dims::new(n, d);
            let id = format!("N{n}_D{d}");
            let mut rng = Rng::new(0);
            let za = rng.matrix(n, d);
            let zb = rng.correlated(&za, 0.5);
            let up = |x: &[f32]| -> CudaSlice<f32> { s.clone_htod(x).unwrap() };
            let (a, b) = (up(&za), up(&zb));
            let (mut da, mut db) = (up(&za), up(&zb));
            let config = LossConfig::default().math(math);
            g.throughput(Throughput::Elements((6 * n * d * d) as u64));

            let loss = BarlowTwinsLoss::new(config).unwrap();
            if math == Math::Bf16 {
                let to16 = |x: &[f32]| -> CudaSlice<half::bf16> {
                    s.clone_htod(
                        &x.iter()
                            .map(|&v| half::bf16::from_f32(v))
                            .collect::<Vec<_>>(),
                    )
                    .unwrap()
                };
                let (a16, b16) = (to16(&za), to16(&zb));
                let (mut da16, mut db16) = (to16(&za), to16(&zb));
                g.bench_function(BenchmarkId::new("barlow", &id), |bch| {
                    bch.iter_custom(|iters| {
                        gpu_iter(&s, iters, || {
                            loss.forward_backward(&s, &a16, &b16, dims, &mut da16, &mut db16)
                                .unwrap();
                        })
                    })
                });
            } else {
                g.bench_function(BenchmarkId::new("barlow", &id), |bch| {
                    bch.iter_custom(|iters| {
                        gpu_iter(&s, iters, || {
                            loss.forward_backward(&s, &a, &b, dims, &mut da, &mut db)
                                .unwrap();
                        })
                    })
                });
            }
            drop(loss);

            match NaiveLoss::new(&s, config) {
                Ok(mut naive) => {
                    g.bench_function(BenchmarkId::new("naive", &id), |bch| {
                        bch.iter_custom(|iters| {
                            gpu_iter(&s, iters, || {
                                if let Err(e) =
                                    naive.forward_backward(&a, &b, dims, &mut da, &mut db)
                                {
                                    println!("naive N={n} D={d}: {e}");
                                }
                            })
                        })
                    });
                }
                Err(e) => println!("SKIP: naive N={n} D={d}: {e}"),
            }

            if math != Math::Bf16 {
                let mut ops = CudaOps::new(&s).unwrap();
                let mut cm: CudaSlice<f32> = s.alloc_zeros(d * d).unwrap();
                g.bench_function(BenchmarkId::new("cublas-gemm", &id), |bch| {
                    bch.iter_custom(|iters| {
                        gpu_iter(&s, iters, || {
                            ops.cross_correlation(math, &a, &b, dims, &mut cm).unwrap();
                        })
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, cpu, cuda);
criterion_main!(benches);
