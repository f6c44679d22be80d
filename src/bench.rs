//! Measuring the loss: the work and traffic each shape implies, timers (CUDA events on the GPU,
//! wall clock on the CPU), and the side-by-side table behind `barlow bench loss`.

use crate::cuda::cudarc::driver::{CudaSlice, CudaStream};
use crate::cuda::naive::NaiveLoss;
use crate::cuda::ops::CudaOps;
use crate::cuda::{device_label, drv, memory};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::{BarlowTwinsLoss, Dims, LossConfig, LossPath, Math};
use std::sync::Arc;
use std::time::Instant;

/// Floating-point work and compulsory memory traffic of one forward+backward.
#[derive(Debug, Clone, Copy)]
pub struct Work {
    /// The three D×D×N GEMMs (C, dẐa, dẐb): 6·N·D².
    pub flops: f64,
    /// Bytes no implementation of this algorithm can avoid: read Za, Zb and write dZa, dZb once,
    /// write C, read it, write dL/dC, read it (f32, 4·4·D²).
    pub bytes: f64,
}

/// Work of one forward+backward for inputs of `in_bytes` per element.
pub fn loss_work(dims: Dims, in_bytes: usize) -> Work {
    let (n, d) = (dims.n as f64, dims.d as f64);
    Work {
        flops: 6.0 * n * d * d,
        bytes: 4.0 * n * d * in_bytes as f64 + 16.0 * d * d,
    }
}

/// Summary of repeated timings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Median of the timed calls, milliseconds.
    pub median_ms: f64,
    /// Fastest timed call, milliseconds.
    pub min_ms: f64,
    /// Number of timed calls.
    pub runs: usize,
}

impl Timing {
    pub(crate) fn from(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let runs = ms.len();
        let median_ms = if runs == 0 {
            f64::NAN
        } else if runs % 2 == 1 {
            ms[runs / 2]
        } else {
            0.5 * (ms[runs / 2 - 1] + ms[runs / 2])
        };
        Self {
            median_ms,
            min_ms: ms.first().copied().unwrap_or(f64::NAN),
            runs,
        }
    }
}

/// Wall-clock timing of `f` after `warmup` untimed calls.
pub fn time_cpu(
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timing::from(ms))
}

/// GPU timing of `f` with CUDA events recorded around each call on `stream`.
pub fn time_gpu(
    stream: &Arc<CudaStream>,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize().map_err(drv("synchronizing"))?;
    let timing = Some(crate::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = stream
            .record_event(timing)
            .map_err(drv("recording an event"))?;
        f()?;
        let end = stream
            .record_event(timing)
            .map_err(drv("recording an event"))?;
        end.synchronize().map_err(drv("waiting for an event"))?;
        ms.push(f64::from(
            start.elapsed_ms(&end).map_err(drv("reading an event"))?,
        ));
    }
    Ok(Timing::from(ms))
}

/// One measured row of the benchmark table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// `cuda` or `cpu`.
    pub device: String,
    /// `barlow` (fused), `naive`, `cublas-gemm` (one plain GEMM of the C shape), or a PyTorch
    /// variant (`pytorch-eager`, `pytorch-compile`).
    pub path: String,
    /// `f32`, `tf32` or `bf16`.
    pub math: String,
    /// Batch size N.
    pub n: usize,
    /// Feature dimension D.
    pub d: usize,
    /// `ok`, `oom` or an error message.
    pub status: String,
    /// Median time per call, milliseconds (absent when the row did not run).
    pub median_ms: Option<f64>,
    /// Fastest call, milliseconds.
    pub min_ms: Option<f64>,
    /// Peak device memory (pool high-water mark, inputs and gradients included).
    pub peak_bytes: Option<u64>,
}

impl Row {
    fn new(device: &str, path: &str, math: Math, dims: Dims) -> Self {
        Self {
            device: device.into(),
            path: path.into(),
            math: math_name(math).into(),
            n: dims.n,
            d: dims.d,
            status: "ok".into(),
            median_ms: None,
            min_ms: None,
            peak_bytes: None,
        }
    }

    fn finish(mut self, r: Result<(Timing, Option<u64>)>) -> Self {
        match r {
            Ok((t, peak)) => {
                self.median_ms = Some(t.median_ms);
                self.min_ms = Some(t.min_ms);
                self.peak_bytes = peak;
            }
            Err(Error::OutOfDeviceMemory { .. }) => self.status = "oom".into(),
            Err(e) => self.status = e.to_string(),
        }
        self
    }
}

/// The name used in tables and JSON for a math mode.
pub fn math_name(m: Math) -> &'static str {
    match m {
        Math::F32 => "f32",
        Math::Tf32 => "tf32",
        Math::Bf16 => "bf16",
    }
}

/// The row name of the fused loss by `path`: `barlow` (auto), `barlow-direct`, `barlow-gram`.
pub fn path_row(path: LossPath) -> &'static str {
    match path {
        LossPath::Auto => "barlow",
        LossPath::Direct => "barlow-direct",
        LossPath::Gram => "barlow-gram",
    }
}

/// Parses `auto`, `direct` or `gram`.
pub fn parse_path(s: &str) -> Result<LossPath> {
    match s {
        "auto" => Ok(LossPath::Auto),
        "direct" => Ok(LossPath::Direct),
        "gram" => Ok(LossPath::Gram),
        other => Err(Error::InvalidConfig(format!(
            "unknown path `{other}` (use auto, direct or gram)"
        ))),
    }
}

/// Parses `f32`, `tf32` or `bf16`.
pub fn parse_math(s: &str) -> Result<Math> {
    match s {
        "f32" => Ok(Math::F32),
        "tf32" => Ok(Math::Tf32),
        "bf16" => Ok(Math::Bf16),
        other => Err(Error::InvalidConfig(format!(
            "unknown precision `{other}` (use f32, tf32 or bf16)"
        ))),
    }
}

/// How many warm-up and timed calls each measurement makes.
#[derive(Debug, Clone, Copy)]
pub struct Repeats {
    /// Untimed calls first (module loading, workspace allocation, clocks).
    pub warmup: usize,
    /// Timed calls.
    pub timed: usize,
}

/// Measures the CPU path for one shape (f32; the CPU ignores `Math`).
pub fn bench_cpu(dims: Dims, reps: Repeats, seed: u64, path: LossPath) -> Row {
    let row = Row::new("cpu", path_row(path), Math::F32, dims);
    let run = || -> Result<(Timing, Option<u64>)> {
        let mut rng = Rng::new(seed);
        let za = rng.matrix(dims.n, dims.d);
        let zb = rng.correlated(&za, 0.5);
        let loss = BarlowTwinsLoss::new(LossConfig {
            path,
            ..Default::default()
        })?;
        let (mut a, mut b) = (vec![0f32; dims.len()], vec![0f32; dims.len()]);
        let t = time_cpu(reps.warmup, reps.timed, || {
            loss.forward_backward_cpu(&za, &zb, dims, &mut a, &mut b)
                .map(|_| ())
        })?;
        Ok((t, None))
    };
    row.finish(run())
}

fn measure_gpu(
    stream: &Arc<CudaStream>,
    reps: Repeats,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(Timing, Option<u64>)> {
    let ctx = stream.context();
    stream.synchronize().map_err(drv("synchronizing"))?;
    memory::reset_peak(ctx)?;
    f()?;
    stream.synchronize().map_err(drv("synchronizing"))?;
    let peak = memory::peak_bytes(ctx)?;
    let t = time_gpu(stream, reps.warmup, reps.timed, f)?;
    Ok((t, peak))
}

fn upload<T: crate::cuda::cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    x: &[T],
) -> Result<CudaSlice<T>> {
    stream
        .clone_htod(x)
        .map_err(drv("uploading benchmark inputs"))
}

/// Measures, for one shape and precision on `stream`: the fused loss by each of `paths`, and with
/// `baselines` the naive port and one plain cuBLAS GEMM of C's shape (the unit of the floor).
/// Bf16 feeds the fused loss bf16 inputs.
#[allow(clippy::too_many_arguments)]
pub fn bench_gpu(
    stream: &Arc<CudaStream>,
    dims: Dims,
    math: Math,
    reps: Repeats,
    seed: u64,
    paths: &[LossPath],
    baselines: bool,
) -> Vec<Row> {
    let mut rng = Rng::new(seed);
    let za = rng.matrix(dims.n, dims.d);
    let zb = rng.correlated(&za, 0.5);
    let mut rows: Vec<Row> = paths
        .iter()
        .map(|&p| bench_fused(stream, dims, math, reps, p, &za, &zb))
        .collect();
    if baselines {
        rows.extend(bench_baselines(stream, dims, math, reps, &za, &zb));
    }
    rows
}

fn to_bf16(x: &[f32]) -> Vec<half::bf16> {
    x.iter().map(|&v| half::bf16::from_f32(v)).collect()
}

fn bench_fused(
    stream: &Arc<CudaStream>,
    dims: Dims,
    math: Math,
    reps: Repeats,
    path: LossPath,
    za: &[f32],
    zb: &[f32],
) -> Row {
    let config = LossConfig {
        math,
        path,
        ..Default::default()
    };
    let run = || -> Result<(Timing, Option<u64>)> {
        let loss = BarlowTwinsLoss::new(config)?;
        if math == Math::Bf16 {
            let (a, b) = (upload(stream, &to_bf16(za))?, upload(stream, &to_bf16(zb))?);
            let (mut da, mut db) = (upload(stream, &to_bf16(za))?, upload(stream, &to_bf16(zb))?);
            measure_gpu(stream, reps, || {
                loss.forward_backward(stream, &a, &b, dims, &mut da, &mut db)
                    .map(|_| ())
            })
        } else {
            let (a, b) = (upload(stream, za)?, upload(stream, zb)?);
            let (mut da, mut db) = (upload(stream, za)?, upload(stream, zb)?);
            measure_gpu(stream, reps, || {
                loss.forward_backward(stream, &a, &b, dims, &mut da, &mut db)
                    .map(|_| ())
            })
        }
    };
    Row::new(device_label(stream), path_row(path), math, dims).finish(run())
}

fn bench_baselines(
    stream: &Arc<CudaStream>,
    dims: Dims,
    math: Math,
    reps: Repeats,
    za: &[f32],
    zb: &[f32],
) -> Vec<Row> {
    let config = LossConfig {
        math,
        ..Default::default()
    };
    let naive = || -> Result<(Timing, Option<u64>)> {
        let mut loss = NaiveLoss::new(stream, config)?;
        let (a, b) = (upload(stream, za)?, upload(stream, zb)?);
        let (mut da, mut db) = (upload(stream, za)?, upload(stream, zb)?);
        measure_gpu(stream, reps, || {
            loss.forward_backward(&a, &b, dims, &mut da, &mut db)
                .map(|_| ())
        })
    };
    let gemm = || -> Result<(Timing, Option<u64>)> {
        let mut ops = CudaOps::new(stream)?;
        let mut c = crate::cuda::alloc::<f32>(stream, dims.d * dims.d, "allocating C")?;
        if math == Math::Bf16 {
            let (a, b) = (upload(stream, &to_bf16(za))?, upload(stream, &to_bf16(zb))?);
            measure_gpu(stream, reps, || {
                ops.cross_correlation(math, &a, &b, dims, &mut c)
            })
        } else {
            let (a, b) = (upload(stream, za)?, upload(stream, zb)?);
            measure_gpu(stream, reps, || {
                ops.cross_correlation(math, &a, &b, dims, &mut c)
            })
        }
    };
    vec![
        Row::new(device_label(stream), "naive", math, dims).finish(naive()),
        Row::new(device_label(stream), "cublas-gemm", math, dims).finish(gemm()),
    ]
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.3}"))
}

fn fmt_mib(v: Option<u64>) -> String {
    v.map_or("-".into(), |x| {
        format!("{:.0}", x as f64 / (1024.0 * 1024.0))
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.2}x", b / a),
        _ => "-".into(),
    }
}

/// One table: per (device, N, D, precision), barlow beside the naive path, PyTorch (when its rows
/// are given) and the GEMM floor, with throughput and memory.
pub fn render_table(rows: &[Row]) -> String {
    let mut keys: Vec<(String, usize, usize, String)> = rows
        .iter()
        .map(|r| (r.device.clone(), r.n, r.d, r.math.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    let find = |k: &(String, usize, usize, String), path: &str| {
        rows.iter().find(|r| {
            r.device == k.0 && r.n == k.1 && r.d == k.2 && r.math == k.3 && r.path == path
        })
    };
    let ms = |r: Option<&Row>| r.and_then(|r| r.median_ms);
    let cell = |r: Option<&Row>| match r {
        Some(r) if r.status == "ok" => fmt_ms(r.median_ms),
        Some(r) if r.status == "oom" => "OOM".into(),
        Some(_) => "error".into(),
        None => "-".into(),
    };
    let mut out = String::new();
    out.push_str(&format!(
        "{:<5} {:>5} {:>6} {:<5} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>7} {:>7} {:>7} | {:>7} {:>8} {:>6} | {:>7} {:>7} {:>7} {:>7}\n",
        "dev", "N", "D", "prec", "barlow", "direct", "gram", "naive", "pt-eager", "pt-comp", "vs-nv", "vs-pt", "vs-ptc",
        "GFLOP/s", "GB/s", "%3gemm", "MiB", "gr-MiB", "nv-MiB", "pt-MiB"
    ));
    for k in &keys {
        let direct = find(k, "barlow-direct");
        let gram = find(k, "barlow-gram");
        // The barlow column is the auto path; rates fall back to the direct path when only the
        // forced paths were measured.
        let auto = find(k, "barlow");
        let b = auto.or(direct).or(gram);
        let nv = find(k, "naive");
        let pe = find(k, "pytorch-eager");
        let pc = find(k, "pytorch-compile");
        let gemm = find(k, "cublas-gemm");
        let in_bytes = if k.3 == "bf16" { 2 } else { 4 };
        let dims = Dims::new(k.1, k.2);
        let mut work = loss_work(dims, in_bytes);
        // The Gram path does other work: 8·N²·D flops, and N² instead of D² for the matrices.
        let b_is_gram = match (auto, direct) {
            (Some(_), _) => LossPath::Auto.resolve(dims) == LossPath::Gram,
            (None, Some(_)) => false,
            (None, None) => gram.is_some(),
        };
        if b_is_gram {
            let (n, d) = (k.1 as f64, k.2 as f64);
            work.flops = 8.0 * n * n * d;
            work.bytes = 4.0 * n * d * in_bytes as f64 + 16.0 * n * n;
        }
        let (tflops, gbs) = match ms(b) {
            Some(t) => (
                format!("{:.0}", work.flops / (t * 1e-3) / 1e9),
                format!("{:.0}", work.bytes / (t * 1e-3) / 1e9),
            ),
            None => ("-".into(), "-".into()),
        };
        let frac = match (ms(b), ms(gemm)) {
            (Some(t), Some(g)) => format!("{:.0}%", 100.0 * 3.0 * g / t),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<5} {:>5} {:>6} {:<5} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>7} {:>7} {:>7} | {:>7} {:>8} {:>6} | {:>7} {:>7} {:>7} {:>7}\n",
            k.0, k.1, k.2, k.3,
            cell(auto), cell(direct), cell(gram), cell(nv), cell(pe), cell(pc),
            ratio(ms(b), ms(nv)), ratio(ms(b), ms(pe)), ratio(ms(b), ms(pc)),
            tflops, gbs, frac,
            fmt_mib(b.and_then(|r| r.peak_bytes)),
            fmt_mib(gram.and_then(|r| r.peak_bytes)),
            fmt_mib(nv.and_then(|r| r.peak_bytes)),
            fmt_mib(pe.and_then(|r| r.peak_bytes)),
        ));
    }
    out.push_str(
        "barlow: the path Auto picks; direct, gram: each path forced (the rates and ratios use barlow, \
         else direct). vs-*: barlow's speed-up over that column. GFLOP/s and GB/s: barlow's rate on \
         its path's GEMM work (direct 6·N·D², Gram 8·N²·D) and compulsory bytes. %3gemm: three plain cuBLAS GEMMs of C's shape as a share \
         of barlow's time (100% = nothing but GEMM). MiB: peak device memory, inputs included.\n",
    );
    out
}

/// Reads JSON lines written by `benches/pytorch/loss.py` (or by `barlow bench loss --json`).
pub fn read_rows(text: &str) -> Result<Vec<Row>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<Row>(l)
                .map_err(|e| Error::InvalidConfig(format!("benchmark results line {}: {e}", i + 1)))
        })
        .collect()
}
