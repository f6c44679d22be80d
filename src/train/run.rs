//! The training run behind `barlow train`: data, model, LARS, the step loop with a progress bar,
//! the kNN monitor, JSON-lines metrics, checkpoints every epoch, and the final plot.
//!
//! Everything random derives from the seed (model init) and from (seed, epoch, index) (data order
//! and augmentations), so a run resumed from a checkpoint continues exactly as an uninterrupted
//! one would.

use super::augment::{two_views, AugmentConfig};
use super::checkpoint;
use super::cuda::{DeviceOptions, DeviceTrainer};
use super::data::{self, Dataset, Splits};
use super::eval::{features_with, knn_top1};
use super::folder::{self, append_metric, RunFolder};
use super::ranks::{Link, Member, Ranks};
use super::{BarlowTwins, Lars, LarsConfig, ModelConfig, Schedule};
use crate::collective::Collective;
use crate::cuda::cudnn::AlgoSearch;
use crate::cuda::nccl::Nccl;
use crate::error::{Error, Result};
use crate::nn::resnet::{Arch, ResNetConfig, Stem};
use crate::nn::{CpuBackend, Tensor};
use crate::rng::Rng;
use crate::LossValue;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

/// Everything that defines a run (`TrainConfig::default()` is the README's main job; setters
/// change one field).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct TrainConfig {
    /// `builtin`, `fashion-mnist`, or a dataset folder (see [`data::open`]); a folder is
    /// stored as an absolute path when a run starts. Any OS path works, UTF-8 or not.
    #[serde(with = "crate::io::os_path")]
    pub data: PathBuf,
    /// Backbone architecture.
    pub arch: Arch,
    /// `None`: small for images up to 64 pixels, ImageNet otherwise.
    pub stem: Option<Stem>,
    /// Channels of the backbone's first stage (64 in torchvision); later stages double it.
    pub width: usize,
    /// Projector layer widths after the backbone's features (paper: 8192, 8192, 8192).
    pub projector: Vec<usize>,
    /// Weight λ of the loss's off-diagonal (redundancy-reduction) term; the paper uses 0.0051.
    pub lambda: f32,
    /// Images per batch (each gives two views).
    pub batch_size: usize,
    /// Passes over the training images; a resumed run may raise it to extend the run.
    pub epochs: usize,
    /// `None`: 10, or a tenth of the run when it is shorter than 100 epochs.
    pub warmup_epochs: Option<usize>,
    /// Base learning rate of weights, scaled by batch / 256 at the peak of the [`Schedule`].
    pub lr_weights: f32,
    /// Base learning rate of biases and norm weights (one-dimensional parameters), scaled the same
    /// way.
    pub lr_biases: f32,
    /// LARS weight decay, applied to weights only (not to one-dimensional parameters).
    pub weight_decay: f32,
    /// Crop size; `None`: the dataset's image size (224 for large images).
    pub crop: Option<usize>,
    /// Use at most this many training images (0: all).
    pub max_train: usize,
    /// kNN monitor: every this many epochs (0: only before and after), k, temperature, and at
    /// most this many bank and test images.
    pub knn_every: usize,
    /// kNN monitor: number of nearest bank images that vote.
    pub knn_k: usize,
    /// kNN monitor: temperature of the votes, each weighted by exp(similarity / t).
    pub knn_t: f32,
    /// kNN monitor: at most this many training images in the bank.
    pub knn_bank: usize,
    /// kNN monitor: at most this many test images classified.
    pub knn_test: usize,
    /// Seed of the model's initialization, the data order and the augmentations.
    pub seed: u64,
    /// Where the step runs (not saved: a run may resume on another machine).
    #[serde(skip)]
    pub device: DeviceChoice,
    /// Element type of activations on the GPU (not saved, like the device).
    #[serde(skip)]
    pub precision: Precision,
    /// How cuDNN's convolution algorithms are chosen on the GPU (not saved).
    #[serde(skip)]
    pub cudnn: AlgoSearch,
    /// Bytes of decoded images an image folder may hold in memory; a larger dataset is decoded
    /// from its files as views are made (not saved: a property of the machine).
    #[serde(skip, default = "default_image_memory")]
    pub image_memory: usize,
    /// For tests of the error paths: the data thread fails at this batch of every epoch.
    #[doc(hidden)]
    #[serde(skip)]
    pub inject_data_failure: Option<usize>,
}

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeviceChoice {
    /// The first CUDA device when one works (kernels built in, driver, cuBLAS and cuDNN found),
    /// else the CPU.
    Auto,
    /// The CPU, with all its threads.
    #[default]
    Cpu,
    /// The first CUDA device, or an error saying what is missing.
    Cuda,
}

/// Element type of activations and weights in the CUDA step (master weights and accumulation
/// stay f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Precision {
    /// bf16 activations and weight copies: the fast mode.
    #[default]
    Bf16,
    /// f32 everywhere, no tensor-core rounding: for checking against the CPU.
    F32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("builtin"),
            arch: Arch::Resnet18,
            stem: None,
            width: 16,
            projector: vec![512, 512, 512],
            lambda: 0.0051,
            batch_size: 256,
            epochs: 4,
            warmup_epochs: None,
            lr_weights: 0.2,
            lr_biases: 0.0048,
            weight_decay: 1.5e-6,
            crop: None,
            max_train: 0,
            knn_every: 1,
            knn_k: 20,
            knn_t: 0.1,
            knn_bank: 10_000,
            knn_test: 2_000,
            seed: 0,
            device: DeviceChoice::Cpu,
            precision: Precision::Bf16,
            cudnn: AlgoSearch::Benchmark,
            image_memory: data::DEFAULT_IMAGE_MEMORY,
            inject_data_failure: None,
        }
    }
}

setters!(TrainConfig {
    data: PathBuf,
    arch: Arch,
    stem: Option<Stem>,
    width: usize,
    projector: Vec<usize>,
    lambda: f32,
    batch_size: usize,
    epochs: usize,
    warmup_epochs: Option<usize>,
    lr_weights: f32,
    lr_biases: f32,
    weight_decay: f32,
    crop: Option<usize>,
    max_train: usize,
    knn_every: usize,
    knn_k: usize,
    knn_t: f32,
    knn_bank: usize,
    knn_test: usize,
    seed: u64,
    device: DeviceChoice,
    precision: Precision,
    cudnn: AlgoSearch,
    image_memory: usize,
});

fn default_image_memory() -> usize {
    data::DEFAULT_IMAGE_MEMORY
}

/// Where and how the training step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct EngineOptions {
    /// The device.
    pub device: DeviceChoice,
    /// Element type of activations on the GPU.
    pub precision: Precision,
    /// How cuDNN's convolution algorithms are chosen on the GPU.
    pub cudnn: AlgoSearch,
    /// The CUDA device to open (0 unless a rank of a group picks its own).
    pub ordinal: usize,
}

impl EngineOptions {
    /// `device` and `precision` on device 0, algorithms chosen by timing them.
    pub fn new(device: DeviceChoice, precision: Precision) -> Self {
        Self {
            device,
            precision,
            cudnn: AlgoSearch::default(),
            ordinal: 0,
        }
    }

    /// With convolution algorithms chosen by `cudnn`.
    pub fn cudnn(self, cudnn: AlgoSearch) -> Self {
        Self { cudnn, ..self }
    }

    /// On CUDA device `ordinal`.
    pub fn ordinal(self, ordinal: usize) -> Self {
        Self { ordinal, ..self }
    }
}

/// The step's machinery: the CPU layers, or a device-resident copy of the model.
pub enum Engine {
    /// The CPU layers, updating the host model in place.
    Cpu,
    /// The CPU layers as one rank of a data-parallel group (see [`Engine::join`]).
    CpuRank(Box<dyn Collective>),
    /// A device-resident model with bf16 activations and f32 master weights.
    CudaBf16(Box<DeviceTrainer<half::bf16>>),
    /// A device-resident model in f32 throughout.
    CudaF32(Box<DeviceTrainer<f32>>),
}

impl Engine {
    /// Opens the engine `options.device` asks for. `Auto` falls back to the CPU, saying why
    /// through `say`, when there is no usable GPU or the GPU fails to set the model up (memory, a
    /// CUDA, cuDNN or cuBLAS error); configuration errors, and every error under `Cuda`, are
    /// returned. On a GPU it opens its own context and stream, with cudarc's per-buffer event
    /// tracking off (the trainer orders its two streams itself).
    pub fn open(
        options: EngineOptions,
        model: &mut BarlowTwins,
        opt: &Lars,
        batch: usize,
        image: (usize, usize, usize),
        say: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let EngineOptions {
            device: choice,
            precision,
            cudnn,
            ordinal,
        } = options;
        if choice == DeviceChoice::Cpu {
            say(&format!(
                "running on the CPU ({} threads)",
                rayon::current_num_threads()
            ));
            return Ok(Engine::Cpu);
        }
        let opened = crate::cuda::open_stream(ordinal).and_then(|stream| {
            // SAFETY: the context object is this engine's own (open_stream made it), and the
            // trainer orders its upload stream with its own events; no buffer exists yet.
            unsafe { stream.context().disable_event_tracking() };
            let name = stream
                .context()
                .name()
                .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
            let options = DeviceOptions::default().cudnn(cudnn);
            let engine = match precision {
                Precision::Bf16 => Engine::CudaBf16(Box::new(DeviceTrainer::new(
                    &stream,
                    model,
                    opt,
                    batch,
                    image,
                    options.fma_only(false),
                )?)),
                Precision::F32 => Engine::CudaF32(Box::new(DeviceTrainer::new(
                    &stream,
                    model,
                    opt,
                    batch,
                    image,
                    options.fma_only(true),
                )?)),
            };
            Ok((engine, name))
        });
        match opened {
            Ok((engine, name)) => {
                say(&format!(
                    "running on {name} ({})",
                    match precision {
                        Precision::Bf16 => "bf16 activations, f32 master weights",
                        Precision::F32 => "f32, no tensor-core rounding",
                    }
                ));
                Ok(engine)
            }
            Err(e)
                if choice == DeviceChoice::Auto
                    && (e.is_unavailable()
                        || matches!(
                            e,
                            Error::OutOfDeviceMemory { .. }
                                | Error::Cuda { .. }
                                | Error::Cudnn { .. }
                                | Error::Cublas { .. }
                        )) =>
            {
                // No GPU at all, or one this model cannot be set up on (memory, a convolution
                // cuDNN has no algorithm for): `auto` means the CPU then, said out loud.
                let what = if e.is_unavailable() {
                    "no usable GPU"
                } else {
                    "the GPU could not be set up"
                };
                say(&format!("{what} ({e}); running on the CPU"));
                Ok(Engine::Cpu)
            }
            Err(e) => Err(e),
        }
    }

    /// Makes this engine rank `rank` of a data-parallel group of `world` reached through `link`
    /// (the CPU engine through a [`Collective`], a CUDA engine through NCCL, on its own stream):
    /// from then on each step takes this rank's share of the batch and every rank takes the
    /// step of the whole batch (see [`DeviceTrainer::join`]). A GPU rank blocks here until
    /// every rank has joined.
    pub fn join(&mut self, rank: usize, world: usize, link: Link) -> Result<()> {
        match (self, link) {
            (this @ Engine::Cpu, Link::Cpu(group)) => {
                if (group.rank(), group.world_size()) != (rank, world) {
                    return Err(Error::InvalidConfig(format!(
                        "rank {rank} of {world} given the group member {} of {}",
                        group.rank(),
                        group.world_size()
                    )));
                }
                *this = Engine::CpuRank(group);
                Ok(())
            }
            (Engine::CudaBf16(t), Link::Nccl(id)) => {
                t.join(group_on_own_stream(t.stream(), rank, world, &id)?)
            }
            (Engine::CudaF32(t), Link::Nccl(id)) => {
                t.join(group_on_own_stream(t.stream(), rank, world, &id)?)
            }
            (Engine::CpuRank(_), _) => Err(Error::InvalidConfig(
                "this engine is already a rank of a group".into(),
            )),
            (Engine::Cpu, Link::Nccl(_)) => Err(Error::InvalidConfig(
                "a CPU engine cannot join an NCCL group (ranks on GPUs need --device cuda)".into(),
            )),
            (_, Link::Cpu(_)) => Err(Error::InvalidConfig(
                "a CUDA engine joins its group through NCCL, not a CPU collective".into(),
            )),
        }
    }

    /// One training step on two views: forward, loss, backward, LARS.
    pub fn step(
        &mut self,
        model: &mut BarlowTwins,
        opt: &mut Lars,
        y1: &Tensor,
        y2: &Tensor,
        (lw, lb): (f32, f32),
    ) -> Result<LossValue> {
        match self {
            Engine::Cpu => {
                let v = model.forward_backward(&CpuBackend, y1, y2)?;
                opt.step(model, lw, lb);
                Ok(v)
            }
            Engine::CpuRank(group) => {
                let v = model.forward_backward_across(&CpuBackend, group.as_ref(), y1, y2)?;
                opt.step(model, lw, lb);
                Ok(v)
            }
            Engine::CudaBf16(t) => {
                t.stage(y1, y2)?;
                t.step(lw, lb)
            }
            Engine::CudaF32(t) => {
                t.stage(y1, y2)?;
                t.step(lw, lb)
            }
        }
    }

    /// Brings weights, statistics and optimizer state to the host model (a no-op on the CPU).
    pub fn sync(&mut self, model: &mut BarlowTwins, opt: &mut Lars) -> Result<()> {
        match self {
            Engine::Cpu | Engine::CpuRank(_) => Ok(()),
            Engine::CudaBf16(t) => t.sync_to_host(model, opt),
            Engine::CudaF32(t) => t.sync_to_host(model, opt),
        }
    }

    /// The compute stream of a CUDA engine.
    pub fn stream(&self) -> Option<std::sync::Arc<cudarc::driver::CudaStream>> {
        match self {
            Engine::Cpu | Engine::CpuRank(_) => None,
            Engine::CudaBf16(t) => Some(t.stream().clone()),
            Engine::CudaF32(t) => Some(t.stream().clone()),
        }
    }

    /// Turns per-phase timing on or off (CUDA engines; the CPU has none).
    pub fn set_timing(&mut self, on: bool) {
        match self {
            Engine::Cpu | Engine::CpuRank(_) => {}
            Engine::CudaBf16(t) => t.set_timing(on),
            Engine::CudaF32(t) => t.set_timing(on),
        }
    }

    /// Milliseconds per phase since timing was turned on.
    pub fn timings(&mut self) -> Result<Vec<(super::cuda::Phase, f64)>> {
        match self {
            Engine::Cpu | Engine::CpuRank(_) => Ok(Vec::new()),
            Engine::CudaBf16(t) => t.timings(),
            Engine::CudaF32(t) => t.timings(),
        }
    }

    /// Backbone features in evaluation mode.
    pub fn features(&mut self, model: &mut BarlowTwins, x: &Tensor) -> Result<Tensor> {
        match self {
            Engine::Cpu | Engine::CpuRank(_) => Ok(model.features(&CpuBackend, x)),
            Engine::CudaBf16(t) => t.features(x),
            Engine::CudaF32(t) => t.features(x),
        }
    }
}

/// A communicator on a new stream of `compute`'s context, so that the gradient all-reduce
/// overlaps the backward pass (see [`DeviceTrainer::join`]).
fn group_on_own_stream(
    compute: &std::sync::Arc<cudarc::driver::CudaStream>,
    rank: usize,
    world: usize,
    id: &crate::cuda::nccl::NcclId,
) -> Result<Nccl> {
    let own = compute
        .context()
        .new_stream()
        .map_err(crate::cuda::drv("making the group's stream"))?;
    Nccl::init_rank(&own, rank, world, id)
}

/// What a run reports at its end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// The run folder written to.
    pub out_dir: PathBuf,
    /// kNN top-1 accuracy (0 to 1) at random initialization; NaN for a resumed run.
    pub knn_initial: f64,
    /// kNN top-1 accuracy (0 to 1) after the last epoch (the initial one if none was measured).
    pub knn_final: f64,
    /// Loss of the last step; NaN when no step ran.
    pub final_loss: f64,
    /// Steps taken in total, counting those before a resume.
    pub steps: usize,
    /// Training images per second over the steps of this invocation.
    pub images_per_second: f64,
}

/// Files of a run folder.
pub struct RunFiles {
    /// The folder holding the run's files.
    pub dir: PathBuf,
}

impl RunFiles {
    /// The checkpoint, rewritten after every epoch.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    /// The JSON-lines metrics: one line per step and per kNN evaluation.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    /// The plot of the training curves (PNG).
    pub fn plot(&self) -> PathBuf {
        self.dir.join("curves.png")
    }
}

/// Opens the training and test splits as the config says.
pub fn load_data(cfg: &TrainConfig) -> Result<Splits> {
    let s = data::open_with(&cfg.data, cfg.image_memory, cfg.max_train)?;
    if s.train.len() < cfg.batch_size {
        return Err(Error::dataset(
            &cfg.data,
            format!(
                "{} training images is fewer than one batch of {}",
                s.train.len(),
                cfg.batch_size
            ),
        ));
    }
    Ok(s)
}

fn model_config(cfg: &TrainConfig, ds: &Dataset, aug: &AugmentConfig) -> ModelConfig {
    ModelConfig {
        backbone: ResNetConfig {
            arch: cfg.arch,
            stem: cfg.stem.unwrap_or(if aug.size <= 64 {
                Stem::Small
            } else {
                Stem::Imagenet
            }),
            in_channels: ds.channels(),
            width: cfg.width,
        },
        projector: cfg.projector.clone(),
        lambda: cfg.lambda,
    }
}

/// Deterministic order of the training images in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng =
        Rng::new(seed ^ 0xD1B5_4A32_D192_ED03 ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    order
}

/// Hooks for progress output; the CLI draws a bar, tests stay quiet.
pub trait Progress {
    /// Called once before the first step, with the run's total steps and the step it starts at.
    fn start(&mut self, _total_steps: usize, _first_step: usize) {}
    /// Called after every step with its number, its loss and the images per second so far this
    /// epoch.
    fn step(&mut self, _step: usize, _loss: f64, _images_per_second: f64) {}
    /// A line of information for the user.
    fn message(&mut self, _text: &str) {}
    /// Called once when the last step is done.
    fn finish(&mut self) {}
    /// Asked after every step: `true` ends the run there with [`Error::Interrupted`], the
    /// checkpoint of the last finished epoch kept (the CLI answers Ctrl-C this way).
    fn stop_requested(&self) -> bool {
        false
    }
}

/// No output.
pub struct Quiet;
impl Progress for Quiet {}

/// The kNN monitor: top-1 of test features against training features.
pub struct Knn {
    bank: Dataset,
    test: Dataset,
    classes: usize,
    k: usize,
    t: f32,
}

impl Knn {
    /// Picks the bank and test images for the monitor from the splits, as `cfg` limits them.
    pub fn new(s: &Splits, cfg: &TrainConfig) -> Self {
        let classes = s
            .train
            .classes
            .len()
            .max(1 + s.train.labels.iter().copied().max().unwrap_or(0) as usize);
        Self {
            bank: s.train.subsampled(cfg.knn_bank),
            test: s.test.subsampled(cfg.knn_test),
            classes,
            k: cfg.knn_k,
            t: cfg.knn_t,
        }
    }

    /// Top-1 accuracy (0 to 1) of the engine's current backbone on the test images.
    pub fn top1(
        &self,
        engine: &mut Engine,
        model: &mut BarlowTwins,
        aug: &AugmentConfig,
    ) -> Result<f64> {
        let dim = model.backbone.config.features();
        let mut f = |x: &Tensor| engine.features(model, x);
        let fb = features_with(&self.bank, aug, 256, true, &mut f)?;
        let ft = features_with(&self.test, aug, 256, true, &mut f)?;
        knn_top1(
            &fb,
            &self.bank.labels,
            &ft,
            &self.test.labels,
            dim,
            self.classes,
            self.k,
            self.t,
        )
    }
}

fn state_json(
    cfg: &TrainConfig,
    model: &ModelConfig,
    aug: &AugmentConfig,
    step: usize,
    epoch: usize,
) -> serde_json::Value {
    serde_json::json!({
        "format": 1,
        "step": step,
        "epoch": epoch,
        "seed": cfg.seed,
        "train": cfg,
        "model": model,
        "augment": aug,
    })
}

/// Refuses a CPU step whose activations cannot fit, from a lower bound: both views' inputs and
/// at least four stem-resolution tensors of `width` channels each, in f32. A real step needs
/// several times this, so nothing that could run is refused.
fn check_step_memory(m: &ModelConfig, batch: usize, c_in: usize, crop: usize) -> Result<()> {
    let side = if m.backbone.stem == Stem::Small {
        crop
    } else {
        crop.div_ceil(2)
    } as f64;
    let per_view = (c_in + 4 * m.backbone.width) as f64 * side * side;
    let bytes = 2.0 * batch as f64 * per_view * 4.0;
    match crate::io::available_memory() {
        Some(free) if bytes > free as f64 => Err(Error::OutOfHostMemory {
            during: format!(
                "holding one step's activations at batch {batch} and crop {crop} (lower the \
                 batch size or the crop)"
            ),
            bytes: bytes as usize,
        }),
        _ => Ok(()),
    }
}

/// What continues a saved run: its checkpoint, and the settings a resume may change. Every other
/// setting is the saved run's.
///
/// ```no_run
/// use barlow::train::run::{train, Quiet, Resume, TrainConfig};
/// use std::path::Path;
///
/// let run = Path::new("runs/first");
/// train(&TrainConfig::default().epochs(2), run, None, &mut Quiet)?;
/// // Later: the same run, extended to 4 epochs, in its own folder.
/// let more = Resume::new(run.join("checkpoint.safetensors")).epochs(Some(4));
/// train(&TrainConfig::default(), run, Some(&more), &mut Quiet)?;
/// # Ok::<(), barlow::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Resume {
    /// The checkpoint: the latest of the run when it continues in its own folder; any of its
    /// checkpoints when a new run starts from it in a folder that holds no run.
    pub checkpoint: PathBuf,
    /// Extends the run to this many epochs (`None`: the saved count).
    pub epochs: Option<usize>,
    /// Where the run's dataset is now, when it moved (`None`: the saved path).
    pub data: Option<PathBuf>,
}

impl Resume {
    /// Continues the run of `checkpoint` with its saved settings.
    pub fn new(checkpoint: impl Into<PathBuf>) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            ..Self::default()
        }
    }
}

setters!(Resume {
    epochs: Option<usize>,
    data: Option<PathBuf>,
});

/// Trains as `cfg` says, writing into `out`. With `resume`, continues the run saved in that
/// checkpoint with the settings it was saved with (only those [`Resume`] holds may change);
/// `cfg` then gives only what belongs to the machine (device, precision, algorithm search,
/// image memory).
///
/// A run writes only into its own folder: a new run needs a folder that holds no run, and a
/// resumed one continues in its folder only from that run's latest checkpoint (a checkpoint of
/// another run, or an older snapshot, is refused; in a new folder it starts a new run).
pub fn train(
    cfg: &TrainConfig,
    out: &Path,
    resume: Option<&Resume>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    train_with(cfg, &Ranks::One, out, resume, progress)
}

/// [`train`] on the ranks `ranks` describes: each rank takes its share of every batch (rank r
/// the r-th slice of the batch's images, `batch_size / world` of them), every rank takes the step
/// of the whole batch, and rank 0 alone reports progress, evaluates and writes the run folder.
/// A checkpoint records the world size; a run may resume on another number of ranks (the step
/// is the whole batch's either way).
pub fn train_with(
    cfg: &TrainConfig,
    ranks: &Ranks,
    out: &Path,
    resume: Option<&Resume>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    super::ranks::run(cfg, ranks, out, resume, progress)
}

/// The run a run folder holds: its id, and the run and step it started from when it began from
/// another run's checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) id: String,
    pub(crate) parent: Option<(Option<String>, u64)>,
}

impl Identity {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "parent": self.parent.as_ref().map(|(id, step)| serde_json::json!({
                "id": id, "step": step
            })),
        })
    }
}

/// What every rank of a run shares: the configuration as resolved (a resumed run's wins), the
/// data, and where the run starts.
pub(crate) struct Setup {
    pub(crate) cfg: TrainConfig,
    pub(crate) aug: AugmentConfig,
    pub(crate) mcfg: ModelConfig,
    pub(crate) splits: Splits,
    /// The checkpoint resumed from; ranks without it start from rank 0's state.
    pub(crate) loaded: Option<checkpoint::Loaded>,
    pub(crate) step: usize,
    /// The world size the resumed checkpoint was written by.
    pub(crate) saved_world: Option<usize>,
    /// How rank 0 uses the run folder (checked again once it holds the lock).
    pub(crate) intent: OwnedIntent,
    pub(crate) identity: Identity,
}

/// [`folder::Intent`] with owned parts, so a [`Setup`] can carry it.
pub(crate) enum OwnedIntent {
    New,
    Resume {
        checkpoint: PathBuf,
        id: Option<String>,
        step: u64,
    },
}

impl OwnedIntent {
    pub(crate) fn borrow(&self) -> folder::Intent<'_> {
        match self {
            OwnedIntent::New => folder::Intent::New,
            OwnedIntent::Resume {
                checkpoint,
                id,
                step,
            } => folder::Intent::Resume {
                checkpoint,
                id: id.as_deref(),
                step: *step,
            },
        }
    }
}

/// A dataset folder as an absolute path, so a run resumed from another working directory finds
/// it; the names of built-in datasets stay as they are.
fn absolute_data(data: &Path) -> PathBuf {
    if data::is_builtin_name(data) {
        return data.to_path_buf();
    }
    std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf())
}

/// What identifies a run's dataset, kept in its checkpoints so a moved dataset (`--data` on a
/// resume) can be checked against it.
fn data_summary(s: &Splits) -> serde_json::Value {
    // FNV-1a over the labels and the first images (a hash that never changes between builds).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    };
    for l in &s.train.labels {
        eat(&l.to_le_bytes());
    }
    for i in 0..s.train.len().min(8) {
        eat(&s.train.image(i).data);
    }
    serde_json::json!({
        "train": s.train.len(),
        "classes": s.train.classes,
        "fingerprint": format!("{h:016x}"),
    })
}

impl Setup {
    /// Resolves `cfg` against the checkpoint `resume` names, checks `out` against the run it
    /// continues, and opens the data.
    pub(crate) fn new(cfg: &TrainConfig, out: &Path, resume: Option<&Resume>) -> Result<Setup> {
        let loaded = resume
            .map(|r| checkpoint::load(&r.checkpoint))
            .transpose()?;
        let bad = |l: &checkpoint::Loaded, what: &str, e: serde_json::Error| Error::Checkpoint {
            path: l.path.clone(),
            reason: format!("{what}: {e}"),
        };
        let (resolved, intent) = match (&loaded, resume) {
            (Some(l), Some(r)) => {
                let mut saved: TrainConfig = serde_json::from_value(l.state["train"].clone())
                    .map_err(|e| bad(l, "train configuration", e))?;
                let done = l.state["epoch"].as_u64().unwrap_or(0) as usize;
                if let Some(n) = r.epochs {
                    if n < saved.epochs {
                        return Err(Error::InvalidConfig(format!(
                            "--epochs {n} is fewer than the {} epochs the run was started \
                             with; a resume may only extend a run",
                            saved.epochs
                        )));
                    }
                    saved.epochs = n;
                }
                if done >= saved.epochs {
                    return Err(Error::InvalidConfig(format!(
                        "the run of {} already finished its {} epoch(s); give --epochs with \
                         more to extend it",
                        r.checkpoint.display(),
                        saved.epochs
                    )));
                }
                if let Some(d) = &r.data {
                    saved.data = absolute_data(d);
                }
                saved.local_from(cfg);
                let (id, step) = folder::checkpoint_run(&l.state);
                let intent = OwnedIntent::Resume {
                    checkpoint: r.checkpoint.clone(),
                    id,
                    step,
                };
                (saved, intent)
            }
            _ => {
                let mut fresh = cfg.clone();
                fresh.data = absolute_data(&cfg.data);
                (fresh, OwnedIntent::New)
            }
        };
        validate(&resolved)?;
        // Refused before the data is read; checked again once the folder is locked.
        let use_ = folder::check(out, &intent.borrow())?;
        let splits = load_data(&resolved)?;
        if let Some(l) = &loaded {
            let saved = &l.state["data"];
            let now = data_summary(&splits);
            if !saved.is_null() && *saved != now {
                return Err(Error::dataset(
                    &resolved.data,
                    format!(
                        "does not hold the dataset the run trained on ({} training images in \
                         classes {}, fingerprint {}; the run had {} in {}, fingerprint {})",
                        now["train"],
                        now["classes"],
                        now["fingerprint"],
                        saved["train"],
                        saved["classes"],
                        saved["fingerprint"]
                    ),
                ));
            }
        }
        let aug = match &loaded {
            Some(l) => serde_json::from_value(l.state["augment"].clone())
                .map_err(|e| bad(l, "augment configuration", e))?,
            None => AugmentConfig::for_dataset(&splits.train, resolved.crop),
        };
        let step = loaded
            .as_ref()
            .map_or(0, |l| l.state["step"].as_u64().unwrap_or(0) as usize);
        let saved_world = loaded
            .as_ref()
            .map(|l| l.state["world"].as_u64().unwrap_or(1) as usize);
        let identity = match (&intent, use_) {
            (OwnedIntent::Resume { id: Some(id), .. }, folder::Use::Continue) => Identity {
                id: id.clone(),
                parent: loaded
                    .as_ref()
                    .and_then(|l| l.state["run"]["parent"].as_object().cloned())
                    .map(|p| {
                        (
                            p.get("id").and_then(|v| v.as_str()).map(str::to_string),
                            p.get("step").and_then(|v| v.as_u64()).unwrap_or(0),
                        )
                    }),
            },
            (OwnedIntent::Resume { id, step, .. }, folder::Use::Fresh) => Identity {
                id: folder::new_run_id(),
                parent: Some((id.clone(), *step)),
            },
            _ => Identity {
                id: folder::new_run_id(),
                parent: None,
            },
        };
        Ok(Setup {
            mcfg: model_config(&resolved, &splits.train, &aug),
            cfg: resolved,
            aug,
            splits,
            loaded,
            step,
            saved_world,
            intent,
            identity,
        })
    }

    /// What rank 0 hands the ranks of other processes: the resolved configuration, the
    /// augmentations and the step to start at.
    pub(crate) fn shared_state(&self) -> serde_json::Value {
        serde_json::json!({
            "train": self.cfg,
            "augment": self.aug,
            "step": self.step,
        })
    }

    /// The setup of a rank that received rank 0's `state`; `cfg` gives this machine's settings
    /// (device, precision, algorithm search, image memory).
    pub(crate) fn from_shared(cfg: &TrainConfig, state: &serde_json::Value) -> Result<Setup> {
        let bad = |what: &str, e: serde_json::Error| Error::Collective {
            during: "reading rank 0's run state".into(),
            message: format!("{what}: {e}"),
        };
        let mut resolved: TrainConfig =
            serde_json::from_value(state["train"].clone()).map_err(|e| bad("train", e))?;
        resolved.local_from(cfg);
        validate(&resolved)?;
        let aug: AugmentConfig =
            serde_json::from_value(state["augment"].clone()).map_err(|e| bad("augment", e))?;
        let splits = load_data(&resolved)?;
        Ok(Setup {
            mcfg: model_config(&resolved, &splits.train, &aug),
            cfg: resolved,
            aug,
            splits,
            loaded: None,
            step: state["step"].as_u64().unwrap_or(0) as usize,
            saved_world: None,
            intent: OwnedIntent::New,
            identity: Identity {
                id: String::new(),
                parent: None,
            },
        })
    }
}

impl TrainConfig {
    /// Takes the settings that belong to the machine, not the run, from `local`.
    fn local_from(&mut self, local: &TrainConfig) {
        self.device = local.device;
        self.precision = local.precision;
        self.cudnn = local.cudnn;
        self.image_memory = local.image_memory;
        self.inject_data_failure = local.inject_data_failure;
    }
}

/// One rank's run (the whole run when it is the only one). Only rank 0 touches `out` and
/// `progress`.
pub(crate) fn run_rank(
    setup: &Setup,
    member: Member,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let Setup {
        cfg,
        aug,
        mcfg,
        splits,
        ..
    } = setup;
    let (rank, world) = (member.rank, member.world);
    let lead = rank == 0;
    let files = RunFiles {
        dir: out.to_path_buf(),
    };
    let mut model = BarlowTwins::new(mcfg.clone(), &mut Rng::new(cfg.seed))?;
    let mut opt = Lars::new(LarsConfig {
        weight_decay: cfg.weight_decay,
        ..Default::default()
    });
    if let Some(l) = &setup.loaded {
        l.restore_model(&mut model)?;
        l.restore_optimizer(&mut model, &mut opt)?;
    }
    let mut step = setup.step;
    let local_batch = cfg.batch_size / world;

    let steps_per_epoch = splits.train.len() / cfg.batch_size;
    let total = cfg.epochs * steps_per_epoch;
    let warmup_epochs = cfg.warmup_epochs.unwrap_or(if cfg.epochs >= 100 {
        10
    } else {
        cfg.epochs.div_ceil(10)
    });
    let schedule = Schedule {
        base_lr_weights: cfg.lr_weights,
        base_lr_biases: cfg.lr_biases,
        batch_size: cfg.batch_size,
        warmup_steps: warmup_epochs * steps_per_epoch,
        total_steps: total,
    };
    let knn = Knn::new(splits, cfg);
    let c_in = splits.train.channels();
    let mut quiet = Quiet;
    let progress: &mut dyn Progress = if lead { progress } else { &mut quiet };
    let mut engine = Engine::open(
        EngineOptions::new(member.device(cfg.device), cfg.precision)
            .cudnn(cfg.cudnn)
            .ordinal(member.ordinal),
        &mut model,
        &opt,
        local_batch,
        (c_in, aug.size, aug.size),
        &mut |m| progress.message(m),
    )?;
    if let Some(link) = member.link {
        engine.join(rank, world, link)?;
    }
    if matches!(engine, Engine::Cpu | Engine::CpuRank(_)) {
        check_step_memory(mcfg, local_batch, c_in, aug.size)?;
    }
    let claim = if lead {
        let claim = RunFolder::claim(out, &setup.intent.borrow())?;
        match claim.use_ {
            folder::Use::Fresh => {
                let mut identity = setup.identity.json();
                identity["format"] = 1.into();
                identity["data"] = cfg.data.display().to_string().into();
                claim.write_identity(&identity)?;
            }
            // Steps after the resumed checkpoint are taken again: their old lines go.
            folder::Use::Continue => folder::truncate_metrics(&files.metrics(), step as u64)?,
        }
        Some(claim)
    } else {
        None
    };
    if setup.loaded.is_some() || setup.step > 0 {
        let done = step / steps_per_epoch.max(1);
        progress.message(&format!(
            "resuming at step {step} (epoch {done} of {}): {} epoch(s) to go, writing into {}",
            cfg.epochs,
            cfg.epochs.saturating_sub(done),
            out.display()
        ));
    }
    if let Some(saved) = setup.saved_world.filter(|&w| w != world) {
        progress.message(&format!(
            "the checkpoint was written by {saved} rank(s), this run has {world}: the batch of \
             {} is split {world} ways instead (the step is the whole batch's either way)",
            cfg.batch_size
        ));
    }
    progress.message(&format!(
        "data {}: {} train / {} test images of {}x{}x{}, crop {}; {:?} width {} ({} stem), projector {:?}; batch {}, {} epochs of {} steps",
        cfg.data.display(),
        splits.train.len(),
        splits.test.len(),
        splits.train.dims(0).0,
        splits.train.dims(0).1,
        splits.train.channels(),
        aug.size,
        cfg.arch,
        cfg.width,
        if mcfg.backbone.stem == Stem::Small { "small" } else { "imagenet" },
        cfg.projector,
        cfg.batch_size,
        cfg.epochs,
        steps_per_epoch
    ));
    if world > 1 {
        progress.message(&format!(
            "data parallel: {world} ranks of {local_batch} images each"
        ));
    }

    let knn_initial = if step == 0 && lead {
        let acc = knn.top1(&mut engine, &mut model, aug)?;
        progress.message(&format!("kNN top-1 at random init: {:.2}%", 100.0 * acc));
        append_metric(
            &files.metrics(),
            &serde_json::json!({"event": "knn", "epoch": 0, "step": 0, "top1": acc}),
        )?;
        acc
    } else {
        f64::NAN
    };

    let mut final_loss = f64::NAN;
    let mut knn_final = knn_initial;
    let started = Instant::now();
    let first_step = step;
    progress.start(total, step);
    let start_epoch = step / steps_per_epoch.max(1);
    let inject_data_failure = cfg.inject_data_failure;
    for epoch in start_epoch..cfg.epochs {
        let order = epoch_order(splits.train.len(), cfg.seed, epoch as u64);
        let skip = step - epoch * steps_per_epoch;
        // This rank's slice of every batch of the epoch.
        let batches: Vec<&[usize]> = order
            .chunks_exact(cfg.batch_size)
            .skip(skip)
            .map(|b| &b[rank * local_batch..(rank + 1) * local_batch])
            .collect();
        // Views for the next batch are built on another thread while this one trains.
        let (tx, rx) = sync_channel::<(Tensor, Tensor)>(1);
        let result: Result<()> = std::thread::scope(|scope| {
            let train_set = &splits.train;
            let seed = cfg.seed;
            let feeder = scope.spawn(move || {
                for (b, idx) in batches.into_iter().enumerate() {
                    if inject_data_failure == Some(b) {
                        panic!("injected data-thread failure at batch {b}");
                    }
                    if tx
                        .send(two_views(train_set, idx, aug, seed, epoch as u64))
                        .is_err()
                    {
                        break;
                    }
                }
            });
            let mut window = (Instant::now(), 0usize);
            let trained = (|| -> Result<()> {
                for (y1, y2) in rx.iter() {
                    let (lw, lb) = schedule.lr(step);
                    let diverged = |loss: f64| Error::Diverged {
                        what: "training".into(),
                        at: format!("step {}", step + 1),
                        value: format!("the loss became {loss}"),
                        advice: lower_rates(cfg),
                    };
                    // Non-finite activations reach the loss as non-finite inputs: the same story.
                    let v = match engine.step(&mut model, &mut opt, &y1, &y2, (lw, lb)) {
                        Err(Error::NonFinite { total }) => return Err(diverged(total)),
                        r => r?,
                    };
                    if !v.total.is_finite() {
                        return Err(diverged(v.total));
                    }
                    step += 1;
                    final_loss = v.total;
                    window.1 += cfg.batch_size;
                    let rate = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
                    if !lead {
                        continue;
                    }
                    progress.step(step, v.total, rate);
                    append_metric(
                        &files.metrics(),
                        &serde_json::json!({"event": "step", "epoch": epoch, "step": step,
                            "loss": v.total, "on_diag": v.on_diag, "off_diag": v.off_diag,
                            "lr": lw, "pairs_per_s": rate}),
                    )?;
                    if progress.stop_requested() {
                        return Err(Error::Interrupted { step, kept: true });
                    }
                }
                Ok(())
            })();
            // Whatever ended the loop, the data thread must not wait on a full channel: with the
            // receiver gone its next send fails and it returns, so the join below cannot hang.
            drop(rx);
            let joined = feeder.join();
            trained?;
            joined.map_err(|_| Error::dataset(&cfg.data, "the data thread panicked"))
        });
        if let Err(Error::Interrupted { step, .. }) = result {
            let kept = files.checkpoint().exists();
            if let (false, Some(c)) = (kept, &claim) {
                c.discard_unfinished();
            }
            return Err(Error::Interrupted { step, kept });
        }
        result?;
        if !lead {
            continue;
        }
        let failed = splits.train.decode_failures();
        if failed > 0 {
            progress.message(&format!(
                "warning: {failed} training image file(s) could not be decoded so far; gray \
                 images stood in for them"
            ));
        }
        engine.sync(&mut model, &mut opt)?;
        let done = epoch + 1;
        // The last update of the epoch has no loss after it to show a blow-up: the weights do.
        check_weights(&mut model, done, cfg)?;
        if (cfg.knn_every > 0 && done % cfg.knn_every == 0) || done == cfg.epochs {
            knn_final = knn.top1(&mut engine, &mut model, aug)?;
            progress.message(&format!(
                "epoch {done}: loss {final_loss:.2}, kNN top-1 {:.2}%",
                100.0 * knn_final
            ));
            append_metric(
                &files.metrics(),
                &serde_json::json!({"event": "knn", "epoch": done, "step": step, "top1": knn_final}),
            )?;
        }
        let mut state = state_json(cfg, mcfg, aug, step, done);
        state["world"] = world.into();
        state["run"] = setup.identity.json();
        state["data"] = data_summary(splits);
        checkpoint::save(&files.checkpoint(), &mut model, &opt, &state)?;
    }
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    let images_per_second = ((step - first_step) * cfg.batch_size) as f64 / secs.max(1e-9);
    Ok(Summary {
        out_dir: files.dir.clone(),
        knn_initial,
        knn_final,
        final_loss,
        steps: step,
        images_per_second,
    })
}

fn lower_rates(cfg: &TrainConfig) -> String {
    format!(
        "lower the base learning rates (--lr-weights {}, --lr-biases {}) or warm up longer \
         (--warmup-epochs); the checkpoint of the last finished epoch is kept",
        cfg.lr_weights, cfg.lr_biases
    )
}

/// [`Error::Diverged`] when a parameter or buffer of `model` is not finite at the end of epoch
/// `epoch`.
fn check_weights(model: &mut BarlowTwins, epoch: usize, cfg: &TrainConfig) -> Result<()> {
    use crate::nn::Visit;
    let mut bad: Option<(String, f32)> = None;
    let mut look = |name: &str, v: &[f32]| {
        if bad.is_none() {
            if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                bad = Some((name.to_string(), *x));
            }
        }
    };
    model.params_mut(&mut |p| look(&p.name, &p.value));
    model.buffers_mut(&mut |b| look(&b.name, &b.value));
    match bad {
        None => Ok(()),
        Some((name, x)) => Err(Error::Diverged {
            what: "training".into(),
            at: format!("the end of epoch {epoch}"),
            value: format!("{name} holds {x}"),
            advice: lower_rates(cfg),
        }),
    }
}

fn validate(cfg: &TrainConfig) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidConfig(m));
    if cfg.batch_size < 2 {
        return bad(format!(
            "batch size {} is too small (Barlow Twins standardizes over the batch)",
            cfg.batch_size
        ));
    }
    if cfg.epochs == 0 {
        return bad("epochs must be at least 1".into());
    }
    if cfg.width == 0 || cfg.projector.is_empty() || cfg.projector.contains(&0) {
        return bad("width and projector sizes must be positive".into());
    }
    if !(cfg.lr_weights.is_finite()
        && cfg.lr_biases.is_finite()
        && cfg.lr_weights >= 0.0
        && cfg.lr_biases >= 0.0)
    {
        return bad("learning rates must be finite and >= 0".into());
    }
    if cfg.knn_k == 0 || cfg.knn_t.is_nan() || cfg.knn_t <= 0.0 {
        return bad("kNN needs k >= 1 and a temperature > 0".into());
    }
    Ok(())
}
