//! The training-step benchmark behind `barlow bench train`: images per second of the whole step
//! (two views, forward, loss, backward, LARS, and the upload of the batch) on random images, with
//! a per-phase breakdown from separately profiled steps.
//!
//! Rows share their JSON form with `benches/pytorch/train_bench.py`, so the two can be merged into
//! one table and compared on the same device.

use super::run::{DeviceChoice, Engine, EngineOptions, Precision};
use super::{BarlowTwins, Lars, LarsConfig, ModelConfig};
use crate::bench::Timing;
use crate::cuda::cudnn::AlgoSearch;
use crate::cuda::drv;
use crate::error::{Error, Result};
use crate::nn::resnet::{Arch, ResNetConfig, Stem};
use crate::nn::timed::TimedBackend;
use crate::nn::{CpuBackend, Tensor};
use crate::rng::Rng;
use std::collections::BTreeMap;
use std::time::Instant;

/// What to time ([`TrainBench::paper`] or [`TrainBench::small`], then set fields).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TrainBench {
    /// Backbone architecture.
    pub arch: Arch,
    /// The backbone's first layers.
    pub stem: Stem,
    /// Side of the square random images, in pixels.
    pub image: usize,
    /// Images per step (each gives two views).
    pub batch: usize,
    /// Channels of the backbone's first stage (64 in torchvision); later stages double it.
    pub width: usize,
    /// Projector layer widths after the backbone's features.
    pub projector: Vec<usize>,
    /// Element type of activations on a GPU (the CPU runs f32).
    pub precision: Precision,
    /// Where the steps run.
    pub device: DeviceChoice,
    /// How cuDNN's convolution algorithms are chosen on a GPU.
    pub cudnn: AlgoSearch,
    /// Untimed steps run first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Steps run with per-phase timing after the timed ones (0: no breakdown).
    pub profile_steps: usize,
    /// Seed of the model's initialization and of the random images.
    pub seed: u64,
}

impl TrainBench {
    /// ResNet-50, 224×224, batch 256, projector 8192-8192-8192: the paper's model.
    pub fn paper() -> Self {
        Self {
            arch: Arch::Resnet50,
            stem: Stem::Imagenet,
            image: 224,
            batch: 256,
            width: 64,
            projector: vec![8192; 3],
            precision: Precision::Bf16,
            device: DeviceChoice::Auto,
            cudnn: AlgoSearch::Benchmark,
            warmup: 10,
            steps: 30,
            profile_steps: 5,
            seed: 0,
        }
    }

    /// ResNet-18 with the small-input stem on 32×32 images, batch 256, the paper's projector.
    pub fn small() -> Self {
        Self {
            arch: Arch::Resnet18,
            stem: Stem::Small,
            image: 32,
            ..Self::paper()
        }
    }
}

/// One measured configuration (the JSON line both benchmarks write).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainRow {
    /// Which implementation ran: `barlow`, or a PyTorch variant such as `pytorch-eager`.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// `resnet18` or `resnet50`.
    pub arch: String,
    /// `small` or `imagenet`.
    pub stem: String,
    /// Side of the square images, in pixels.
    pub image: usize,
    /// Images per step (each gives two views).
    pub batch: usize,
    /// Channels of the backbone's first stage.
    #[serde(default)]
    pub width: usize,
    /// Projector layer widths.
    #[serde(default)]
    pub projector: Vec<usize>,
    /// Element type that actually ran: `bf16` or `f32` (always `f32` on the CPU).
    pub precision: String,
    /// Median milliseconds per step.
    #[serde(default)]
    pub step_ms_median: Option<f64>,
    /// Mean milliseconds per step.
    #[serde(default)]
    pub step_ms_mean: Option<f64>,
    /// Images per second at the median step time.
    #[serde(default)]
    pub images_per_s: Option<f64>,
    /// Views per second: twice the images.
    #[serde(default)]
    pub views_per_s: Option<f64>,
    /// Milliseconds per step by phase.
    #[serde(default)]
    pub breakdown_ms: Option<BTreeMap<String, f64>>,
    /// GFLOP/s of the phases whose work is counted (the CPU's operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breakdown_gflops: Option<BTreeMap<String, f64>>,
    /// High-water mark of the device memory pool over the timed steps, in bytes (GPU only).
    #[serde(default)]
    pub peak_mem_bytes: Option<u64>,
    /// Loss of the last timed step, when finite.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Device name, or `cpu (N threads)`.
    #[serde(default)]
    pub device: String,
    /// Why the configuration could not run, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// GPUs that trained together (data parallel, `batch` images each); absent: one device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<usize>,
    /// Images per second per GPU over those of one GPU in the same run (1.0: perfect scaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_efficiency: Option<f64>,
}

impl TrainRow {
    /// Images per second per device.
    pub fn images_per_s_per_gpu(&self) -> Option<f64> {
        self.images_per_s.map(|v| v / self.gpus.unwrap_or(1) as f64)
    }
}

fn arch_name(a: Arch) -> &'static str {
    match a {
        Arch::Resnet18 => "resnet18",
        Arch::Resnet50 => "resnet50",
    }
}

fn stem_name(s: Stem) -> &'static str {
    match s {
        Stem::Small => "small",
        Stem::Imagenet => "imagenet",
    }
}

fn check(b: &TrainBench) -> Result<()> {
    if b.batch < 2 || b.image == 0 || b.width == 0 || b.projector.is_empty() {
        return Err(Error::InvalidConfig(
            "bench train needs batch >= 2 and positive image size, width and projector".into(),
        ));
    }
    if b.projector.contains(&0) || b.steps == 0 {
        return Err(Error::InvalidConfig(
            "projector widths and the step count must be positive".into(),
        ));
    }
    Ok(())
}

fn model_config(b: &TrainBench) -> ModelConfig {
    ModelConfig {
        backbone: ResNetConfig {
            arch: b.arch,
            stem: b.stem,
            in_channels: 3,
            width: b.width,
        },
        projector: b.projector.clone(),
        lambda: 0.0051,
    }
}

/// Random views of one batch and the learning rates of the paper's schedule at its peak.
fn batch_views(b: &TrainBench, rng: &mut Rng) -> (Vec<Tensor>, (f32, f32)) {
    let shape = [b.batch, 3, b.image, b.image];
    let len: usize = shape.iter().product();
    let views = (0..2)
        .map(|_| Tensor::from_vec(&shape, (0..len).map(|_| rng.normal() as f32).collect()))
        .collect();
    let lr = (
        0.2 * b.batch as f32 / 256.0,
        0.0048 * b.batch as f32 / 256.0,
    );
    (views, lr)
}

/// Runs the benchmark; `say` hears progress and the device chosen.
pub fn run(b: &TrainBench, say: &mut dyn FnMut(&str)) -> Result<TrainRow> {
    check(b)?;
    let mut rng = Rng::new(b.seed);
    let mut model = BarlowTwins::new(model_config(b), &mut rng)?;
    let mut opt = Lars::new(LarsConfig::default());
    let mut engine = Engine::open(
        EngineOptions::new(b.device, b.precision).cudnn(b.cudnn),
        &mut model,
        &opt,
        b.batch,
        (3, b.image, b.image),
        say,
    )?;
    let (views, lr) = batch_views(b, &mut rng);
    let step = |engine: &mut Engine, model: &mut BarlowTwins, opt: &mut Lars| {
        engine.step(model, opt, &views[0], &views[1], lr)
    };
    say(&format!("warm-up: {} steps", b.warmup));
    for _ in 0..b.warmup {
        step(&mut engine, &mut model, &mut opt)?;
    }
    let stream = engine.stream();
    if let Some(s) = &stream {
        s.synchronize().map_err(drv("synchronizing"))?;
        crate::cuda::memory::reset_peak(s.context())?;
    }
    say(&format!("timing {} steps", b.steps));
    let mut ms = Vec::with_capacity(b.steps);
    let mut loss = f64::NAN;
    match &stream {
        Some(s) => {
            (ms, loss) = time_on_stream(s, b.steps, || {
                step(&mut engine, &mut model, &mut opt).map(|v| v.total)
            })?;
        }
        None => {
            for _ in 0..b.steps {
                let t = Instant::now();
                loss = step(&mut engine, &mut model, &mut opt)?.total;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let peak = match &stream {
        Some(s) => crate::cuda::memory::peak_bytes(s.context())?,
        None => None,
    };
    let med = Timing::from(ms.clone()).median_ms;
    // The CPU side of the data pipeline: two augmented views of a batch from decoded images (the
    // paper's augmentations; JPEG decoding, for streamed datasets, comes on top). The trainer
    // makes the next batch while the device computes this one, so only what exceeds a step is
    // waited for.
    let augment_ms = if b.profile_steps > 0 {
        say("timing the augmentations of one batch");
        Some(time_augment(b)?)
    } else {
        None
    };
    let mut gflops = None;
    let breakdown = if b.profile_steps > 0 && stream.is_some() {
        say(&format!("profiling {} steps", b.profile_steps));
        engine.set_timing(true);
        let mut host_ms = 0.0;
        for _ in 0..b.profile_steps {
            let t = Instant::now();
            step(&mut engine, &mut model, &mut opt)?;
            host_ms += t.elapsed().as_secs_f64() * 1e3;
        }
        let phases = engine.timings()?;
        engine.set_timing(false);
        let k = b.profile_steps as f64;
        let mut m: BTreeMap<String, f64> = phases
            .into_iter()
            .map(|(p, t)| (p.name().to_string(), t / k))
            .collect();
        m.insert("host (staging + launches)".into(), host_ms / k);
        if let Some(a) = augment_ms {
            m.insert("augment (CPU threads, per batch)".into(), a);
            m.insert("data wait (estimated)".into(), (a - med).max(0.0));
        }
        Some(m)
    } else if b.profile_steps > 0 {
        say(&format!("profiling {} steps by operation", b.profile_steps));
        let (m, g) = cpu_breakdown(b, &mut model, &mut opt, &views, lr)?;
        gflops = Some(g);
        let mut m = m;
        if let Some(a) = augment_ms {
            m.insert("augment (CPU threads, per batch)".into(), a);
        }
        Some(m)
    } else {
        augment_ms.map(|a| BTreeMap::from([("augment (CPU threads, per batch)".to_string(), a)]))
    };
    let device = match &stream {
        Some(s) => s.context().name().unwrap_or_else(|_| "CUDA".into()),
        None => format!("cpu ({} threads)", rayon::current_num_threads()),
    };
    let precision = match (b.precision, stream.is_some()) {
        (_, false) => "f32",
        (Precision::Bf16, true) => "bf16",
        (Precision::F32, true) => "f32",
    };
    let mut r = row(b, precision, ms, loss, device, peak);
    r.breakdown_ms = breakdown;
    r.breakdown_gflops = gflops;
    Ok(r)
}

/// The CPU step by kind of operation, in milliseconds per step, over `b.profile_steps` steps:
/// every backend call timed ([`TimedBackend`]), LARS, and the rest of the step (the loss, ReLU,
/// pooling, residual adds and copies the layers make themselves); and GFLOP/s per kind.
#[allow(clippy::type_complexity)]
fn cpu_breakdown(
    b: &TrainBench,
    model: &mut BarlowTwins,
    opt: &mut Lars,
    views: &[Tensor],
    (lw, lb): (f32, f32),
) -> Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let timed = TimedBackend::new(&CpuBackend);
    let k = b.profile_steps as f64;
    let mut lars_ms = 0.0;
    let started = Instant::now();
    for _ in 0..b.profile_steps {
        model.forward_backward(&timed, &views[0], &views[1])?;
        let t = Instant::now();
        opt.step(model, lw, lb);
        lars_ms += t.elapsed().as_secs_f64() * 1e3;
    }
    let total = started.elapsed().as_secs_f64() * 1e3;
    let spent = timed.spent();
    let counted: f64 = spent.values().map(|s| s.ms).sum::<f64>() + lars_ms;
    let mut ms: BTreeMap<String, f64> = spent
        .iter()
        .map(|(kind, s)| (kind.to_string(), s.ms / k))
        .collect();
    ms.insert("LARS".into(), lars_ms / k);
    ms.insert(
        "loss, ReLU, pooling, adds, copies".into(),
        (total - counted).max(0.0) / k,
    );
    let gflops = spent
        .iter()
        .map(|(kind, s)| (kind.to_string(), s.gflops()))
        .collect();
    Ok((ms, gflops))
}

/// The row of `b` from its step times: the median and mean step, the rates, the last loss.
fn row(
    b: &TrainBench,
    precision: &str,
    ms: Vec<f64>,
    loss: f64,
    device: String,
    peak: Option<u64>,
) -> TrainRow {
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    let med = Timing::from(ms).median_ms;
    let images_per_s = b.batch as f64 / (med / 1e3);
    TrainRow {
        implementation: "barlow".into(),
        arch: arch_name(b.arch).into(),
        stem: stem_name(b.stem).into(),
        image: b.image,
        batch: b.batch,
        width: b.width,
        projector: b.projector.clone(),
        precision: precision.into(),
        step_ms_median: Some(med),
        step_ms_mean: Some(mean),
        images_per_s: Some(images_per_s),
        views_per_s: Some(2.0 * images_per_s),
        breakdown_ms: None,
        breakdown_gflops: None,
        peak_mem_bytes: peak,
        loss: loss.is_finite().then_some(loss),
        device,
        error: None,
        gpus: None,
        scaling_efficiency: None,
    }
}

/// Milliseconds between consecutive steps on `stream` (events recorded between them and read at
/// the end, so the host stays ahead of the device as in training); the loss of the last.
fn time_on_stream(
    stream: &cudarc::driver::CudaStream,
    steps: usize,
    mut step: impl FnMut() -> Result<f64>,
) -> Result<(Vec<f64>, f64)> {
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut marks = vec![stream
        .record_event(flags)
        .map_err(drv("recording an event"))?];
    let mut loss = f64::NAN;
    for _ in 0..steps {
        loss = step()?;
        marks.push(
            stream
                .record_event(flags)
                .map_err(drv("recording an event"))?,
        );
    }
    let mut ms = Vec::with_capacity(steps);
    for w in marks.windows(2) {
        ms.push(f64::from(
            w[0].elapsed_ms(&w[1]).map_err(drv("reading an event"))?,
        ));
    }
    Ok((ms, loss))
}

/// One rank's step times, last loss, device name and peak pool bytes.
type RankTimes = (Vec<f64>, f64, String, Option<u64>);

/// The benchmark on `gpus` GPUs of this machine at once: a worker thread per GPU with `b.batch`
/// images each (so the group's batch is `gpus × b.batch`), NCCL between them, every step the
/// whole group's (synchronized batch norm, the loss across GPUs, gradients summed). Times come
/// from rank 0's stream, which waits on every collective. No per-phase breakdown.
pub fn run_gpus(b: &TrainBench, gpus: usize, say: &mut dyn FnMut(&str)) -> Result<TrainRow> {
    use super::ranks::Link;
    use crate::cuda::nccl::NcclId;
    check(b)?;
    if gpus == 0 {
        return Err(Error::InvalidConfig("bench train on 0 GPUs".into()));
    }
    let found = crate::cuda::device_count()?;
    if gpus > found {
        return Err(Error::NoDevice(format!(
            "{gpus} GPUs asked for, {found} CUDA device(s) found"
        )));
    }
    let id = NcclId::new()?;
    say(&format!(
        "{gpus} GPUs, {} images each: warm-up {} steps, then timing {}",
        b.batch, b.warmup, b.steps
    ));
    let results: Vec<Result<RankTimes>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..gpus)
            .map(|rank| {
                s.spawn(move || {
                    let mut rng = Rng::new(b.seed.wrapping_add(rank as u64));
                    let mut model = BarlowTwins::new(model_config(b), &mut rng)?;
                    let mut opt = Lars::new(LarsConfig::default());
                    let mut engine = Engine::open(
                        EngineOptions::new(DeviceChoice::Cuda, b.precision)
                            .cudnn(b.cudnn)
                            .ordinal(rank),
                        &mut model,
                        &opt,
                        b.batch,
                        (3, b.image, b.image),
                        &mut |_| {},
                    )?;
                    engine.join(rank, gpus, Link::Nccl(id))?;
                    let (views, lr) = batch_views(b, &mut rng);
                    for _ in 0..b.warmup {
                        engine.step(&mut model, &mut opt, &views[0], &views[1], lr)?;
                    }
                    let stream = engine.stream().ok_or_else(|| {
                        Error::InvalidConfig("a GPU rank opened without a stream".into())
                    })?;
                    stream.synchronize().map_err(drv("synchronizing"))?;
                    crate::cuda::memory::reset_peak(stream.context())?;
                    let (ms, loss) = time_on_stream(&stream, b.steps, || {
                        engine
                            .step(&mut model, &mut opt, &views[0], &views[1], lr)
                            .map(|v| v.total)
                    })?;
                    let peak = crate::cuda::memory::peak_bytes(stream.context())?;
                    let name = stream.context().name().unwrap_or_else(|_| "CUDA".into());
                    Ok((ms, loss, name, peak))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Collective {
                        during: "bench train across GPUs".into(),
                        message: "a rank's thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut ranks = Vec::with_capacity(gpus);
    for r in results {
        ranks.push(r?);
    }
    let (ms, loss, name, peak) = ranks.swap_remove(0);
    let precision = match b.precision {
        Precision::Bf16 => "bf16",
        Precision::F32 => "f32",
    };
    let mut r = row(b, precision, ms, loss, name, peak);
    // The group's images per step.
    r.images_per_s = r.images_per_s.map(|v| v * gpus as f64);
    r.views_per_s = r.views_per_s.map(|v| v * gpus as f64);
    r.gpus = Some(gpus);
    Ok(r)
}

/// Sets `many`'s scaling efficiency from `one`, the same configuration on one GPU: images per
/// second per GPU over those of the single GPU.
pub fn set_scaling(one: &TrainRow, many: &mut TrainRow) {
    many.scaling_efficiency = match (one.images_per_s_per_gpu(), many.images_per_s_per_gpu()) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
}

/// Median milliseconds to make the two views of one batch on the CPU threads, from random
/// decoded images of a typical size (4:3 at 1.6× the crop for large crops, the crop itself for
/// small ones).
fn time_augment(b: &TrainBench) -> Result<f64> {
    use super::augment::{two_views, AugmentConfig};
    use super::data::{Dataset, Image};
    let (h, w) = if b.image > 64 {
        (b.image * 8 / 5, b.image * 32 / 15)
    } else {
        (b.image, b.image)
    };
    let mut rng = Rng::new(b.seed ^ 0xA5A5);
    let count = b.batch.min(512);
    let images: Vec<Image> = (0..count)
        .map(|_| Image {
            h,
            w,
            c: 3,
            data: (0..h * w * 3)
                .map(|_| (rng.next_u64() & 0xff) as u8)
                .collect(),
        })
        .collect();
    let ds = Dataset::in_memory("synthetic", images, vec![0; count], vec!["0".into()]);
    let cfg = AugmentConfig::for_dataset(&ds, Some(b.image));
    let idx: Vec<usize> = (0..b.batch).map(|i| i % count).collect();
    let mut ms = Vec::new();
    for epoch in 0..3 {
        let t = Instant::now();
        let views = two_views(&ds, &idx, &cfg, b.seed, epoch);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(views);
    }
    Ok(Timing::from(ms).median_ms)
}

/// Reads JSON-lines rows (this benchmark's or `train_bench.py`'s); blank lines are skipped.
pub fn read_rows(text: &str) -> Result<Vec<TrainRow>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::InvalidConfig(format!("line {}: not a train row: {e}", i + 1)))
        })
        .collect()
}

/// The table: one line per row, with the speed relative to PyTorch eager in the same
/// configuration (arch, image, batch, precision) when that row is present; then each row's
/// breakdown.
pub fn render(rows: &[TrainRow]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<9} {:>5} {:>5} {:<5} {:>10} {:>9} {:>9} {:>10} {:>9}  device",
        "impl",
        "arch",
        "image",
        "batch",
        "prec",
        "step ms",
        "images/s",
        "views/s",
        "vs eager",
        "peak GiB"
    );
    let same = |a: &TrainRow, b: &TrainRow| {
        a.arch == b.arch && a.image == b.image && a.batch == b.batch && a.precision == b.precision
    };
    for r in rows {
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "{:<16} {:<9} {:>5} {:>5} {:<5} error: {e}",
                r.implementation, r.arch, r.image, r.batch, r.precision
            );
            continue;
        }
        let eager = rows
            .iter()
            .filter(|_| r.gpus.is_none())
            .find(|o| o.implementation == "pytorch-eager" && o.error.is_none() && same(o, r))
            .and_then(|o| o.images_per_s);
        let ratio = match (r.images_per_s, eager) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let f = |v: Option<f64>, p: usize| v.map_or("-".into(), |x| format!("{x:.p$}"));
        let label = match r.gpus {
            Some(n) => format!("{} x{n} GPUs", r.implementation),
            None => r.implementation.clone(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<9} {:>5} {:>5} {:<5} {:>10} {:>9} {:>9} {:>10} {:>9}  {}",
            label,
            r.arch,
            r.image,
            r.batch,
            r.precision,
            f(r.step_ms_median, 2),
            f(r.images_per_s, 0),
            f(r.views_per_s, 0),
            ratio,
            r.peak_mem_bytes.map_or("-".into(), |b| format!(
                "{:.1}",
                b as f64 / (1u64 << 30) as f64
            )),
            r.device
        );
    }
    for r in rows {
        if let (Some(n), Some(total), Some(per)) =
            (r.gpus, r.images_per_s, r.images_per_s_per_gpu())
        {
            let _ =
                writeln!(
                out,
                "\n{} {} {}x{} batch {} per GPU {} on {n} GPUs: {total:.0} images/s, {per:.0} per \
                 GPU, scaling efficiency {}",
                r.implementation,
                r.arch,
                r.image,
                r.image,
                r.batch,
                r.precision,
                r.scaling_efficiency
                    .map_or("-".into(), |e| format!("{:.1}% of one GPU's rate", 100.0 * e)),
            );
        }
    }
    for r in rows {
        if let (Some(b), Some(step)) = (&r.breakdown_ms, r.step_ms_median) {
            let _ = writeln!(
                out,
                "\n{} {} {}x{} batch {} {}: ms per step by phase (profiled steps)",
                r.implementation, r.arch, r.image, r.image, r.batch, r.precision
            );
            for (k, v) in b {
                let rate = r
                    .breakdown_gflops
                    .as_ref()
                    .and_then(|g| g.get(k))
                    .map_or(String::new(), |g| format!("  {g:>7.1} GFLOP/s"));
                let _ = writeln!(
                    out,
                    "  {k:<34} {v:>9.2}  {:>5.1}% of the timed step{rate}",
                    100.0 * v / step
                );
            }
        }
    }
    out
}
