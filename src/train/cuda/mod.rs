//! The Barlow Twins training step on one GPU, device-resident: activations, weights, gradients,
//! running statistics and LARS state live on the device; the host stages image batches and reads
//! the loss.
//!
//! The network is the CPU model's ([`BarlowTwins`]) topology, rebuilt as a flat list of nodes over
//! NHWC activation slots: convolutions through cuDNN, batch norm with its ReLU and residual add
//! fused, pooling, linear layers through cuBLAS, and the library's fused loss. Parameters are one
//! flat f32 array (the master copy LARS updates in three launches) plus a working copy in the
//! element type `A` the convolutions and GEMMs read: bf16 for speed, f32 (no tensor-core math)
//! for checking against the CPU.
//!
//! Upload: images go NCHW f32 → NHWC `A` on the host into pinned buffers, then to the device on
//! a second stream, double-buffered, so a batch's copy overlaps the previous step's compute.

mod exec;
mod grads;
mod layout;
mod plan;
mod staging;
mod sync;
mod timing;

pub use layout::{nchw_to_nhwc, ohwi_to_oihw, oihw_to_ohwi};
pub use timing::Phase;

use super::{BarlowTwins, Lars};
use crate::cuda::cudnn::{AlgoSearch, Convolutions};
use crate::cuda::nccl::Nccl;
use crate::cuda::nn::{LarsStep, LarsTables, NnOps, NormMode};
use crate::cuda::{alloc, drv, Act};
use crate::error::{Error, Result};
use crate::nn::ConvSpec;
use crate::{BarlowTwinsLoss, Dims, LossConfig, LossValue, Math};
use cudarc::driver::{CudaSlice, CudaStream};
use grads::Grads;
pub use grads::DEFAULT_BUCKET_BYTES;
use plan::{plan, HostPlan, Node, Op, ParamInfo, Slot};
use staging::Staging;
use std::sync::Arc;
use timing::Timer;

/// How a [`DeviceTrainer`] sets itself up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// Keep every f32 convolution and GEMM off TF32 (the checking mode); no effect in bf16.
    pub fma_only: bool,
    /// How cuDNN's convolution algorithms are chosen.
    pub cudnn: AlgoSearch,
    /// Bytes per gradient bucket of a data-parallel rank (`None`:
    /// [`DEFAULT_BUCKET_BYTES`]).
    pub bucket_bytes: Option<usize>,
}

impl DeviceOptions {
    /// With f32 math kept off TF32 or not.
    pub fn fma_only(self, fma_only: bool) -> Self {
        Self { fma_only, ..self }
    }

    /// With convolution algorithms chosen by `cudnn`.
    pub fn cudnn(self, cudnn: AlgoSearch) -> Self {
        Self { cudnn, ..self }
    }

    /// With gradient buckets of `bytes` each when the trainer joins a group.
    pub fn bucket_bytes(self, bytes: usize) -> Self {
        Self {
            bucket_bytes: Some(bytes),
            ..self
        }
    }
}

/// Device buffers and plans for training one model at a fixed batch size.
///
/// ```no_run
/// use barlow::nn::resnet::{Arch, ResNetConfig, Stem};
/// use barlow::nn::Tensor;
/// use barlow::train::cuda::{DeviceOptions, DeviceTrainer};
/// use barlow::train::{BarlowTwins, Lars, LarsConfig, ModelConfig};
/// # fn main() -> barlow::Result<()> {
/// let backbone = ResNetConfig::new(Arch::Resnet50, Stem::Imagenet, 3, 64);
/// let config = ModelConfig::new(backbone, vec![8192; 3]);
/// let mut model = BarlowTwins::new(config, &mut barlow::rng::Rng::new(0))?;
/// let mut opt = Lars::new(LarsConfig::default());
/// let stream = barlow::cuda::open_stream(0)?;
/// let options = DeviceOptions::default();
/// let mut gpu =
///     DeviceTrainer::<half::bf16>::new(&stream, &mut model, &opt, 256, (3, 224, 224), options)?;
/// # let (view1, view2) = (Tensor::zeros(&[256, 3, 224, 224]), Tensor::zeros(&[256, 3, 224, 224]));
/// gpu.stage(&view1, &view2)?; // two augmented views, NCHW f32
/// let loss = gpu.step(0.2, 0.0048)?; // forward, loss, backward, LARS
/// println!("loss {}", loss.total);
/// gpu.sync_to_host(&mut model, &mut opt)?; // weights and optimizer state, for a checkpoint
/// # Ok(())
/// # }
/// ```
pub struct DeviceTrainer<A: Act> {
    stream: Arc<CudaStream>,
    ops: NnOps,
    convs: Convolutions<A>,
    loss: BarlowTwinsLoss,
    fma_only: bool,
    batch: usize,
    image: (usize, usize, usize),
    slots: Vec<Slot>,
    nodes: Vec<Node>,
    features_slot: usize,
    /// Activations per view (slot 0, the input, is served from the staging buffers).
    acts: [Vec<CudaSlice<A>>; 2],
    /// Activation gradients, shared by the views (slot 0 has none: a one-element stand-in).
    grads: Vec<CudaSlice<A>>,
    /// The second view's gradient of z (the first view's is in `grads`).
    dz_b: CudaSlice<A>,
    stats: [Vec<CudaSlice<f32>>; 2],
    pool_arg: [CudaSlice<u8>; 2],
    infos: Vec<ParamInfo>,
    master: CudaSlice<f32>,
    grad: Grads,
    mom: CudaSlice<f32>,
    work: CudaSlice<A>,
    wgrad: CudaSlice<A>,
    running: CudaSlice<f32>,
    running_names: Vec<(String, usize)>,
    lars: LarsTables,
    lars_cfg: super::LarsConfig,
    staging: Staging<A>,
    /// Training forwards since the last sync to the host (BatchNorm's `num_batches_tracked`).
    forwards: usize,
    timer: Timer,
    /// The data-parallel group this trainer is a rank of, if any.
    group: Option<Nccl>,
    bucket_bytes: usize,
}

/// Elements and bytes of the device state, for error messages and the bench.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Footprint {
    /// Parameter elements (f32 master values).
    pub parameters: usize,
    /// Bytes of activation buffers at the planned batch: both views' activations and one gradient.
    pub activation_bytes: usize,
}

impl<A: Act> DeviceTrainer<A> {
    /// Uploads `model` and the optimizer state of `opt` to the GPU of `stream`, planned for
    /// batches of `batch` images of `image` = (channels, height, width), set up as `options`
    /// says.
    ///
    /// The trainer adds an upload stream to the context and orders it with its own events. It
    /// leaves cudarc's per-buffer event tracking as the context has it: with tracking on, every
    /// launch also waits for and records an event per buffer (correct, slower); a caller that
    /// owns the context can turn tracking off before this call, as [`crate::train::run::Engine`] does
    /// on the context it opens.
    ///
    /// Running out of device memory is reported with the estimated need at this batch size.
    pub fn new(
        stream: &Arc<CudaStream>,
        model: &mut BarlowTwins,
        opt: &Lars,
        batch: usize,
        image: (usize, usize, usize),
        options: DeviceOptions,
    ) -> Result<Self> {
        Self::build(stream, model, opt, batch, image, options).map_err(|e| match e {
            Error::OutOfDeviceMemory { during, bytes } => {
                let need = plan(model, opt, image).map(|p| {
                    let per: usize = p.slots.iter().skip(1).map(|s| s.per_image()).sum();
                    let acts = 3 * per * batch * std::mem::size_of::<A>();
                    let params = p.host.len() * (4 * 3 + std::mem::size_of::<A>());
                    (acts + params) as f64 / (1u64 << 30) as f64
                });
                Error::OutOfDeviceMemory {
                    during: match need {
                        Ok(gib) => format!(
                            "{during} (the trainer needs about {gib:.1} GiB at batch {batch} \
                             before cuDNN's workspace; a smaller --batch-size or bf16 needs less)"
                        ),
                        Err(_) => during,
                    },
                    bytes,
                }
            }
            other => other,
        })
    }

    fn build(
        stream: &Arc<CudaStream>,
        model: &mut BarlowTwins,
        opt: &Lars,
        batch: usize,
        image: (usize, usize, usize),
        options: DeviceOptions,
    ) -> Result<Self> {
        if batch < 2 {
            return Err(Error::BatchTooSmall { n: batch });
        }
        let cfg = model.config.clone();
        if image.1 == 0 || image.2 == 0 {
            return Err(Error::InvalidConfig(format!(
                "images of {}x{} pixels: height and width must be at least 1",
                image.1, image.2
            )));
        }
        if image.0 != cfg.backbone.in_channels {
            return Err(Error::InvalidConfig(format!(
                "images have {} channels but the model expects {}",
                image.0, cfg.backbone.in_channels
            )));
        }
        let ops = NnOps::new(stream)?;
        let fma_only = options.fma_only && A::DTYPE == crate::cuda::Dtype::F32;
        let convs = Convolutions::<A>::new(stream, fma_only, options.cudnn)?;
        let math = if A::DTYPE == crate::cuda::Dtype::F32 {
            Math::F32
        } else {
            Math::Bf16
        };
        let loss = BarlowTwinsLoss::new(LossConfig {
            lambda: cfg.lambda,
            math,
            ..Default::default()
        })?;

        let HostPlan {
            infos,
            host,
            moms,
            run_host,
            running,
            slots,
            nodes,
            feat,
            z_slot,
            norms,
        } = plan(model, opt, image)?;

        // Device buffers.
        let n = batch;
        let total = host.len();
        let act = || -> Result<Vec<CudaSlice<A>>> {
            slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    alloc(
                        stream,
                        if i == 0 { 1 } else { n * s.per_image() },
                        "allocating activations",
                    )
                })
                .collect()
        };
        let acts = [act()?, act()?];
        let grads = slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                alloc(
                    stream,
                    if i == 0 { 1 } else { n * s.per_image() },
                    "allocating activation gradients",
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let dz_b = alloc(
            stream,
            n * slots[z_slot].per_image(),
            "allocating activation gradients",
        )?;
        let max_c = slots.iter().map(|s| s.c).max().unwrap_or(1);
        let stats_set = || -> Result<Vec<CudaSlice<f32>>> {
            (0..norms)
                .map(|_| alloc(stream, 3 * max_c, "allocating norm statistics"))
                .collect()
        };
        let stats = [stats_set()?, stats_set()?];
        let pool_len = nodes
            .iter()
            .filter(|nd| matches!(nd.op, Op::MaxPool { .. }))
            .map(|nd| n * slots[nd.y].per_image())
            .max()
            .unwrap_or(1);
        let pool_arg = [
            alloc(stream, pool_len, "allocating pooling indices")?,
            alloc(stream, pool_len, "allocating pooling indices")?,
        ];
        let up = |v: &[f32], what: &'static str| stream.clone_htod(v).map_err(drv(what));
        let master = up(&host, "uploading parameters")?;
        let mom = up(&moms, "uploading optimizer state")?;
        let running_dev = up(&run_host, "uploading running statistics")?;
        let work_host: Vec<A> = host.iter().map(|&v| A::from_f32(v)).collect();
        let work = stream
            .clone_htod(&work_host)
            .map_err(drv("uploading parameters"))?;
        let grad = Grads::new(stream, total)?;
        let max_w = infos
            .iter()
            .filter(|i| i.is_conv())
            .map(|i| i.len)
            .max()
            .unwrap_or(1);
        let wgrad = alloc(stream, max_w, "allocating weight-gradient scratch")?;
        let tensors: Vec<_> = infos
            .iter()
            .map(|i| (i.off, i.len, i.shape.len() == 1))
            .collect();
        let lars = LarsTables::new(stream, &tensors, total)?;
        let (c_in, h, w) = image;
        let staging = Staging::new(stream, n * c_in * h * w)?;
        let mut running_names: Vec<(String, usize)> = running.into_iter().collect();
        running_names.sort_by_key(|(_, o)| *o);

        let mut this = Self {
            stream: stream.clone(),
            ops,
            convs,
            loss,
            fma_only,
            batch,
            image,
            slots,
            nodes,
            features_slot: feat,
            acts,
            grads,
            dz_b,
            stats,
            pool_arg,
            infos,
            master,
            grad,
            mom,
            work,
            wgrad,
            running: running_dev,
            running_names,
            lars,
            lars_cfg: opt.config,
            staging,
            forwards: 0,
            timer: Timer::default(),
            group: None,
            bucket_bytes: options.bucket_bytes.unwrap_or(DEFAULT_BUCKET_BYTES),
        };
        // Plan every convolution now, at the training batch size; the backward-data pass only
        // where it runs (not for a convolution of the input images).
        let specs: Vec<(ConvSpec, bool)> = this
            .nodes
            .iter()
            .filter_map(|nd| match nd.op {
                Op::Conv { spec, .. } => Some((spec, nd.x != 0)),
                _ => None,
            })
            .collect();
        for (spec, data) in specs {
            this.convs.prepare(&spec, batch, data)?;
        }
        Ok(this)
    }

    /// Makes this trainer one rank of a data-parallel group: from the next step on, every batch
    /// norm is synchronized over the group's ranks, the loss is the whole batch's
    /// ([`crate::BarlowTwinsLoss::forward_backward_across`]) and the gradients are summed over
    /// the ranks before LARS, so W ranks of `batch` images each take the step one trainer takes
    /// on the W·`batch` images. Every rank starts from rank 0's parameters, LARS momentum and
    /// running statistics (broadcast here), so the ranks stay identical step after step.
    ///
    /// `comm` must be on this trainer's context. On a stream of its own (what
    /// [`crate::train::run::Engine::join`] makes), every collective is ordered with the trainer's
    /// stream by events, and the gradients are summed in buckets
    /// ([`DeviceOptions::bucket_bytes`]) while the backward pass goes on; on the trainer's own
    /// stream the same buckets are summed in line.
    pub fn join(&mut self, comm: Nccl) -> Result<()> {
        if comm.stream().context().cu_ctx() != self.stream.context().cu_ctx() {
            return Err(Error::InvalidConfig(
                "the group's communicator is on another device or context than the trainer's"
                    .into(),
            ));
        }
        comm.ordered(&self.stream, |c| {
            c.broadcast_f32(&mut self.master, 0)?;
            c.broadcast_f32(&mut self.mom, 0)?;
            c.broadcast_f32(&mut self.running, 0)
        })?;
        // The working copy the layers read, from the broadcast master.
        let master = self
            .stream
            .clone_dtoh(&self.master)
            .map_err(drv("reading parameters"))?;
        let work: Vec<A> = master.iter().map(|&v| A::from_f32(v)).collect();
        self.stream
            .memcpy_htod(&work, &mut self.work)
            .map_err(drv("uploading parameters"))?;
        self.grad
            .split(&self.stream, &self.infos, &self.nodes, self.bucket_bytes)?;
        self.group = Some(comm);
        Ok(())
    }

    /// Number of gradient buckets summed over the group (0 before [`DeviceTrainer::join`]).
    pub fn gradient_buckets(&self) -> usize {
        self.grad.buckets()
    }

    /// Number of parameters and bytes of activations (both views) and their gradients.
    pub fn footprint(&self) -> Footprint {
        let per: usize = self.slots.iter().skip(1).map(|s| s.per_image()).sum();
        Footprint {
            parameters: self.infos.iter().map(|i| i.len).sum(),
            activation_bytes: 3 * per * self.batch * std::mem::size_of::<A>(),
        }
    }

    /// The compute stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The batch size the buffers were made for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Turns phase timing on (CUDA events around every node) and clears the totals.
    pub fn set_timing(&mut self, on: bool) {
        self.timer.on = on;
        self.timer.marks.clear();
        self.timer.totals.clear();
    }

    /// Milliseconds spent per phase since timing was turned on (waits for the stream).
    pub fn timings(&mut self) -> Result<Vec<(Phase, f64)>> {
        self.timer.collect()?;
        Ok(Phase::ALL
            .iter()
            .map(|p| (*p, self.timer.totals.get(p).copied().unwrap_or(0.0)))
            .collect())
    }
}

impl<A: Act> DeviceTrainer<A> {
    /// Forward and backward of both staged views and the loss: gradients are left in the flat
    /// gradient (read them with [`DeviceTrainer::gradients_to_host`]). Reads the loss back, so
    /// it waits for the forward half of the step.
    pub fn forward_backward(&mut self) -> Result<LossValue> {
        let k = self.staging.next;
        let staged = self.staging.staged[k].take().ok_or_else(|| {
            Error::InvalidConfig("no batch staged: call `stage` before each step".into())
        })?;
        self.stream
            .wait(&staged)
            .map_err(drv("ordering compute after an upload"))?;
        self.staging.next ^= 1;
        let result = self.forward_backward_on(k);
        // Also after a failure: the next upload into slot k must wait for whatever was queued
        // on it.
        let end = self
            .stream
            .record_event(None)
            .map_err(drv("recording the end of a step"));
        match end {
            Ok(e) => self.staging.consumed[k] = Some(e),
            Err(e) => return Err(result.err().unwrap_or(e)),
        }
        result
    }

    fn forward_backward_on(&mut self, k: usize) -> Result<LossValue> {
        let n = self.batch;
        let m = self.timer.start(&self.stream, Phase::Optimizer)?;
        self.grad.zero(&self.stream)?;
        self.timer.stop(&self.stream, m)?;
        let all = self.nodes.len();
        let mode = NormMode::Train { momentum: 0.1 };
        self.forward(0, n, mode, k, all)?;
        self.forward(1, n, mode, k, all)?;
        self.forwards += 2;
        let z = self.nodes[all - 1].y;
        let dims = Dims::new(n, self.slots[z].c);
        let m = self.timer.start(&self.stream, Phase::Loss)?;
        let value = {
            let Self {
                loss,
                acts,
                grads,
                dz_b,
                stream,
                ..
            } = self;
            let [za, zb] = acts;
            match &self.group {
                Some(comm) => comm.ordered(stream, |c| {
                    loss.forward_backward_across(c, &za[z], &zb[z], dims, &mut grads[z], dz_b)
                })?,
                None => loss.forward_backward(stream, &za[z], &zb[z], dims, &mut grads[z], dz_b)?,
            }
        };
        self.timer.stop(&self.stream, m)?;
        self.backward(0, n, k)?;
        std::mem::swap(&mut self.grads[z], &mut self.dz_b);
        let second = self.backward(1, n, k);
        std::mem::swap(&mut self.grads[z], &mut self.dz_b);
        second?;
        if let Some(comm) = &self.group {
            // Every rank's gradients summed (the buckets went during the backward): each rank
            // then takes the same LARS step.
            self.grad.join(comm, &self.stream)?;
        }
        Ok(value)
    }

    /// LARS on every parameter, from the gradients of the last [`DeviceTrainer::forward_backward`].
    pub fn optimizer_step(&mut self, lr_weights: f32, lr_biases: f32) -> Result<()> {
        let m = self.timer.start(&self.stream, Phase::Optimizer)?;
        let hp = LarsStep {
            weight_decay: self.lars_cfg.weight_decay,
            eta: self.lars_cfg.eta,
            momentum: self.lars_cfg.momentum,
            lr_weights,
            lr_biases,
        };
        self.lars.step::<A>(
            &self.ops,
            hp,
            &mut self.master,
            &self.grad.flat,
            &mut self.mom,
            &mut self.work,
        )?;
        self.timer.stop(&self.stream, m)
    }

    /// One training step on the staged batch: forward, loss, backward, LARS.
    pub fn step(&mut self, lr_weights: f32, lr_biases: f32) -> Result<LossValue> {
        let v = self.forward_backward()?;
        self.optimizer_step(lr_weights, lr_biases)?;
        Ok(v)
    }
}
