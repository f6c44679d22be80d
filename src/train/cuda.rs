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

use super::{BarlowTwins, Lars};
use crate::cuda::cudnn::{AlgoSearch, Convolutions};
use crate::cuda::nn::{LarsStep, LarsTables, NnOps, NormMode};
use crate::cuda::{alloc, drv, Act};
use crate::error::{Error, Result};
use crate::nn::resnet::{Arch, Stem};
use crate::nn::{ConvSpec, Tensor, Visit};
use crate::{BarlowTwinsLoss, Dims, LossConfig, LossValue, Math};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// An activation buffer's shape per image: `rows` positions (H·W, or 1 for features) of `c`
/// channels.
#[derive(Debug, Clone, Copy)]
struct Slot {
    rows: usize,
    c: usize,
}

impl Slot {
    fn per_image(&self) -> usize {
        self.rows * self.c
    }
}

/// What a node of the network does. Slots index activations; `p` indexes the parameter table.
#[derive(Debug, Clone)]
enum Op {
    Conv {
        spec: ConvSpec,
        p: usize,
    },
    /// Batch norm (γ at parameter `p`, β at `p + 1`), then `+ residual`, then ReLU. `dense`
    /// marks the projector's norms over N×C features, which run on the loss's standardization
    /// kernel (its affine variant) in training.
    Norm {
        p: usize,
        running: usize,
        stats: usize,
        residual: Option<usize>,
        relu: bool,
        dense: bool,
    },
    MaxPool {
        h: usize,
        w: usize,
    },
    AvgPool,
    Linear {
        p: usize,
        inp: usize,
        out: usize,
    },
}

#[derive(Debug, Clone)]
struct Node {
    op: Op,
    x: usize,
    y: usize,
    /// Whether this node's input gradient (and the residual's) adds to one already written by a
    /// later node: decided once, from the graph, so every gradient is written before it is added.
    acc_x: bool,
    acc_res: bool,
}

/// Time categories of the step breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// cuDNN convolutions, forward and backward.
    Conv,
    /// Batch norm with its fused residual add and ReLU, forward and backward.
    Norm,
    /// Max-pool and global average pool, forward and backward.
    Pool,
    /// The projector's linear layers (cuBLAS), forward and backward.
    Linear,
    /// The fused Barlow Twins loss and its gradient.
    Loss,
    /// Zeroing the gradients and the LARS update.
    Optimizer,
    /// Copying a staged batch to the device, on the upload stream.
    Upload,
}

impl Phase {
    /// Every phase, in the order [`DeviceTrainer::timings`] reports them.
    pub const ALL: [Phase; 7] = [
        Phase::Conv,
        Phase::Norm,
        Phase::Pool,
        Phase::Linear,
        Phase::Loss,
        Phase::Optimizer,
        Phase::Upload,
    ];
    /// A lower-case label for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Conv => "convolutions",
            Phase::Norm => "batch norm",
            Phase::Pool => "pooling",
            Phase::Linear => "linear",
            Phase::Loss => "loss",
            Phase::Optimizer => "optimizer",
            Phase::Upload => "upload",
        }
    }
}

/// CUDA-event timing of each phase, when enabled (it adds two events per node).
#[derive(Default)]
struct Timer {
    on: bool,
    marks: Vec<(Phase, CudaEvent, CudaEvent)>,
    totals: HashMap<Phase, f64>,
}

impl Timer {
    fn start(&mut self, s: &Arc<CudaStream>, phase: Phase) -> Result<Option<usize>> {
        if !self.on {
            return Ok(None);
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = s
            .record_event(flags)
            .map_err(drv("recording a timing event"))?;
        let b = s
            .context()
            .new_event(flags)
            .map_err(drv("creating a timing event"))?;
        self.marks.push((phase, a, b));
        Ok(Some(self.marks.len() - 1))
    }

    fn stop(&mut self, s: &Arc<CudaStream>, mark: Option<usize>) -> Result<()> {
        if let Some(i) = mark {
            self.marks[i]
                .2
                .record(s)
                .map_err(drv("recording a timing event"))?;
        }
        Ok(())
    }

    /// Adds the finished marks into the totals (waits for them).
    fn collect(&mut self) -> Result<()> {
        for (phase, a, b) in self.marks.drain(..) {
            let ms = a.elapsed_ms(&b).map_err(drv("reading a timing event"))?;
            *self.totals.entry(phase).or_default() += f64::from(ms);
        }
        Ok(())
    }
}

/// One parameter tensor of the flat arrays.
#[derive(Debug, Clone)]
struct ParamInfo {
    name: String,
    shape: Vec<usize>,
    off: usize,
    len: usize,
}

impl ParamInfo {
    fn is_conv(&self) -> bool {
        self.shape.len() == 4
    }
}

/// OIHW (the CPU layout, PyTorch's) → OHWI (cuDNN's NHWC filter layout).
pub fn oihw_to_ohwi(v: &[f32], s: &[usize]) -> Vec<f32> {
    permute_filter(v, s, true)
}

/// OHWI → OIHW, the inverse of [`oihw_to_ohwi`].
pub fn ohwi_to_oihw(v: &[f32], s: &[usize]) -> Vec<f32> {
    permute_filter(v, s, false)
}

/// Moves the input-channel axis of a filter of shape `s` (O, I, H, W) last, or back.
fn permute_filter(v: &[f32], s: &[usize], to_last: bool) -> Vec<f32> {
    let (o, i, h, w) = (s[0], s[1], s[2], s[3]);
    let mut out = vec![0f32; v.len()];
    for a in 0..o {
        for b in 0..i {
            for y in 0..h {
                for x in 0..w {
                    let oihw = ((a * i + b) * h + y) * w + x;
                    let ohwi = ((a * h + y) * w + x) * i + b;
                    if to_last {
                        out[ohwi] = v[oihw];
                    } else {
                        out[oihw] = v[ohwi];
                    }
                }
            }
        }
    }
    out
}

/// NCHW f32 images → NHWC `A`, in parallel over images.
pub fn nchw_to_nhwc<A: Act>(x: &[f32], (n, c, h, w): (usize, usize, usize, usize), out: &mut [A]) {
    let item = c * h * w;
    out[..n * item]
        .par_chunks_mut(item)
        .zip(x[..n * item].par_chunks(item))
        .for_each(|(o, i)| {
            for p in 0..h * w {
                for ch in 0..c {
                    o[p * c + ch] = A::from_f32(i[ch * h * w + p]);
                }
            }
        });
}

/// The gradients of slots `y` and `x`, and of `r` when given, mutably at once (they are distinct
/// slots by construction of the graph).
#[allow(clippy::type_complexity)]
fn grad_slots<A: Act>(
    grads: &mut [CudaSlice<A>],
    y: usize,
    x: usize,
    r: Option<usize>,
) -> Result<(
    &mut CudaSlice<A>,
    &mut CudaSlice<A>,
    Option<&mut CudaSlice<A>>,
)> {
    let bad = |e| internal(format!("gradient slots: {e}"));
    Ok(match r {
        Some(r) => {
            let [dy, dx, dr] = grads.get_disjoint_mut([y, x, r]).map_err(bad)?;
            (dy, dx, Some(dr))
        }
        None => {
            let [dy, dx] = grads.get_disjoint_mut([y, x]).map_err(bad)?;
            (dy, dx, None)
        }
    })
}

fn internal(what: String) -> Error {
    Error::InvalidConfig(format!("internal: {what}"))
}

/// Builds the node list of a model, mirroring [`crate::nn::resnet`]'s forward order, with the
/// downsample branch ahead of the norm that adds it.
struct Builder<'a> {
    params: &'a HashMap<String, usize>,
    infos: &'a [ParamInfo],
    running: &'a HashMap<String, usize>,
    slots: Vec<Slot>,
    nodes: Vec<Node>,
    norms: usize,
    /// Spatial size of the current slot.
    hw: (usize, usize),
}

impl Builder<'_> {
    fn param(&self, name: &str) -> Result<usize> {
        self.params
            .get(name)
            .copied()
            .ok_or_else(|| internal(format!("the model has no parameter {name}")))
    }

    fn slot(&mut self, rows: usize, c: usize) -> usize {
        self.slots.push(Slot { rows, c });
        self.slots.len() - 1
    }

    fn push(&mut self, op: Op, x: usize, y: usize) {
        self.nodes.push(Node {
            op,
            x,
            y,
            acc_x: false,
            acc_res: false,
        });
    }

    fn conv(&mut self, name: &str, x: usize, stride: usize, pad: usize) -> Result<usize> {
        let p = self.param(&format!("{name}.weight"))?;
        let s = &self.infos[p].shape;
        let (h, w) = self.hw;
        let k = s[2];
        if h + 2 * pad < k || w + 2 * pad < k {
            return Err(Error::InvalidConfig(format!(
                "{name}: a {h}x{w} input is smaller than its {k}x{k} kernel; use larger images"
            )));
        }
        let spec = ConvSpec {
            in_c: s[1],
            out_c: s[0],
            k: s[2],
            stride,
            pad,
            h,
            w,
        };
        if self.slots[x].c != spec.in_c {
            return Err(internal(format!("{name}: channel mismatch")));
        }
        self.hw = (spec.ho(), spec.wo());
        let y = self.slot(spec.ho() * spec.wo(), spec.out_c);
        self.push(Op::Conv { spec, p }, x, y);
        Ok(y)
    }

    fn norm(
        &mut self,
        name: &str,
        x: usize,
        residual: Option<usize>,
        relu: bool,
        dense: bool,
    ) -> Result<usize> {
        let p = self.param(&format!("{name}.weight"))?;
        let c = self.infos[p].len;
        if self.params.get(&format!("{name}.bias")) != Some(&(p + 1))
            || self.infos[p + 1].off != self.infos[p].off + c
        {
            return Err(internal(format!("{name}: bias does not follow weight")));
        }
        let running = *self
            .running
            .get(name)
            .ok_or_else(|| internal(format!("{name}: no running statistics")))?;
        if dense && residual.is_some() {
            return Err(internal(format!(
                "{name}: a projector norm has no residual"
            )));
        }
        let sl = self.slots[x];
        let y = self.slot(sl.rows, sl.c);
        let stats = self.norms;
        self.norms += 1;
        self.push(
            Op::Norm {
                p,
                running,
                stats,
                residual,
                relu,
                dense,
            },
            x,
            y,
        );
        Ok(y)
    }

    fn block(
        &mut self,
        name: &str,
        bottleneck: bool,
        x: usize,
        stride: usize,
        has_ds: bool,
    ) -> Result<usize> {
        let hw_in = self.hw;
        let mut h = x;
        let k = if bottleneck { 3 } else { 2 };
        for i in 0..k {
            let (s, pad) = if bottleneck {
                if i == 1 {
                    (stride, 1)
                } else {
                    (1, 0)
                }
            } else if i == 0 {
                (stride, 1)
            } else {
                (1, 1)
            };
            h = self.conv(&format!("{name}.conv{}", i + 1), h, s, pad)?;
            if i + 1 < k {
                h = self.norm(&format!("{name}.bn{}", i + 1), h, None, true, false)?;
            }
        }
        let hw_out = self.hw;
        let res = if has_ds {
            self.hw = hw_in;
            let d = self.conv(&format!("{name}.downsample.0"), x, stride, 0)?;
            self.norm(&format!("{name}.downsample.1"), d, None, false, false)?
        } else {
            x
        };
        self.hw = hw_out;
        self.norm(&format!("{name}.bn{k}"), h, Some(res), true, false)
    }
}

/// How a [`DeviceTrainer`] sets itself up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// Keep every f32 convolution and GEMM off TF32 (the checking mode); no effect in bf16.
    pub fma_only: bool,
    /// How cuDNN's convolution algorithms are chosen.
    pub cudnn: AlgoSearch,
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
    copy: Arc<CudaStream>,
    ops: NnOps,
    convs: Convolutions<A>,
    loss: BarlowTwinsLoss,
    fma_only: bool,
    batch: usize,
    image: (usize, usize, usize),
    slots: Vec<Slot>,
    nodes: Vec<Node>,
    features_slot: usize,
    /// Activations per view (slot 0, the input, is served from `inputs`).
    acts: [Vec<CudaSlice<A>>; 2],
    /// Activation gradients, shared by the views (slot 0 has none: a one-element stand-in).
    grads: Vec<CudaSlice<A>>,
    /// The second view's gradient of z (the first view's is in `grads`).
    dz_b: CudaSlice<A>,
    stats: [Vec<CudaSlice<f32>>; 2],
    pool_arg: [CudaSlice<u8>; 2],
    infos: Vec<ParamInfo>,
    master: CudaSlice<f32>,
    grad: CudaSlice<f32>,
    mom: CudaSlice<f32>,
    work: CudaSlice<A>,
    wgrad: CudaSlice<A>,
    running: CudaSlice<f32>,
    running_names: Vec<(String, usize)>,
    lars: LarsTables,
    lars_cfg: super::LarsConfig,
    /// Double-buffered staging: pinned host buffers, device inputs per view, and events.
    pinned: [[PinnedHostSlice<A>; 2]; 2],
    inputs: [[CudaSlice<A>; 2]; 2],
    staged: [Option<CudaEvent>; 2],
    consumed: [Option<CudaEvent>; 2],
    next: usize,
    /// Training forwards since the last sync to the host (BatchNorm's `num_batches_tracked`).
    forwards: usize,
    timer: Timer,
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
        let copy = stream
            .context()
            .new_stream()
            .map_err(drv("creating the upload stream"))?;
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
        let mut grad = alloc(stream, total, "allocating gradients")?;
        stream
            .memset_zeros(&mut grad)
            .map_err(drv("zeroing gradients"))?;
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
        let in_len = n * c_in * h * w;
        let ctx = stream.context();
        let pin = || -> Result<PinnedHostSlice<A>> {
            // SAFETY: the pinned buffer is written in full (by `stage`) before any copy reads it.
            unsafe { ctx.alloc_pinned::<A>(in_len) }.map_err(drv("allocating pinned host memory"))
        };
        let pinned = [[pin()?, pin()?], [pin()?, pin()?]];
        let input = || alloc(stream, in_len, "allocating input batches");
        let inputs = [[input()?, input()?], [input()?, input()?]];
        // The inputs come from the compute stream's pool but are first written on the upload
        // stream: each slot's first upload waits for their allocation, as later ones wait for
        // the step that read them.
        let allocated = || {
            stream
                .record_event(None)
                .map_err(drv("ordering uploads after allocation"))
        };
        let consumed = [Some(allocated()?), Some(allocated()?)];
        let mut running_names: Vec<(String, usize)> = running.into_iter().collect();
        running_names.sort_by_key(|(_, o)| *o);

        let mut this = Self {
            stream: stream.clone(),
            copy,
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
            pinned,
            inputs,
            staged: [None, None],
            consumed,
            next: 0,
            forwards: 0,
            timer: Timer::default(),
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

    fn check_views(&self, a: &Tensor, b: &Tensor) -> Result<()> {
        let (c, h, w) = self.image;
        for (name, t) in [("view 1", a), ("view 2", b)] {
            if t.shape != [self.batch, c, h, w] {
                return Err(Error::InvalidConfig(format!(
                    "{name} has shape {:?}, the trainer was built for [{}, {c}, {h}, {w}]",
                    t.shape, self.batch
                )));
            }
            if t.data.len() != t.shape.iter().product::<usize>() {
                return Err(Error::InvalidConfig(format!(
                    "{name} holds {} values for shape {:?}",
                    t.data.len(),
                    t.shape
                )));
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidConfig(format!(
                    "{name} holds NaN or infinite pixels"
                )));
            }
        }
        Ok(())
    }

    /// Converts two views to NHWC and copies them to the device on the upload stream, into the
    /// buffer the next [`DeviceTrainer::step`] reads. Waits only for the copy out of this pinned
    /// buffer two batches ago.
    pub fn stage(&mut self, a: &Tensor, b: &Tensor) -> Result<()> {
        self.check_views(a, b)?;
        let k = self.next;
        let (c, h, w) = self.image;
        for (v, t) in [a, b].into_iter().enumerate() {
            let host = self.pinned[k][v]
                .as_mut_slice()
                .map_err(drv("waiting for a pinned buffer"))?;
            nchw_to_nhwc(&t.data, (self.batch, c, h, w), host);
        }
        if let Some(e) = &self.consumed[k] {
            self.copy
                .wait(e)
                .map_err(drv("ordering an upload after compute"))?;
        }
        let mark = self.timer.start(&self.copy, Phase::Upload)?;
        for v in 0..2 {
            self.copy
                .memcpy_htod(&self.pinned[k][v], &mut self.inputs[k][v])
                .map_err(drv("uploading a view"))?;
        }
        self.timer.stop(&self.copy, mark)?;
        self.staged[k] = Some(
            self.copy
                .record_event(None)
                .map_err(drv("recording an upload"))?,
        );
        Ok(())
    }
}

impl<A: Act> DeviceTrainer<A> {
    /// One view's forward through the first `upto` nodes, reading the input from staging
    /// buffer `k`.
    fn forward(&mut self, v: usize, n: usize, mode: NormMode, k: usize, upto: usize) -> Result<()> {
        let Self {
            ops,
            convs,
            acts,
            inputs,
            work,
            master,
            running,
            stats,
            pool_arg,
            slots,
            nodes,
            infos,
            timer,
            stream,
            fma_only,
            ..
        } = self;
        for nd in &nodes[..upto] {
            let (lo, hi) = acts[v].split_at_mut(nd.y);
            let y = &mut hi[0];
            let x: &CudaSlice<A> = if nd.x == 0 { &inputs[k][v] } else { &lo[nd.x] };
            let sx = slots[nd.x];
            match &nd.op {
                Op::Conv { spec, p } => {
                    let i = &infos[*p];
                    let m = timer.start(stream, Phase::Conv)?;
                    convs.forward(spec, n, x, &work.slice(i.off..i.off + i.len), y)?;
                    timer.stop(stream, m)?;
                }
                Op::Norm {
                    p,
                    running: r,
                    stats: st,
                    residual,
                    relu,
                    dense,
                } => {
                    let i = &infos[*p];
                    let c = sx.c;
                    let res = residual.map(|r| lo[r].slice(..));
                    let m = timer.start(stream, Phase::Norm)?;
                    if let (true, NormMode::Train { momentum }) = (*dense, mode) {
                        ops.standardize_affine_forward(
                            1e-5,
                            momentum,
                            (n * sx.rows, c),
                            &x.slice(..),
                            &master.slice(i.off..i.off + 2 * c),
                            &mut running.slice_mut(*r..*r + 2 * c),
                            *relu,
                            &mut y.slice_mut(..),
                            &mut stats[v][*st],
                        )?;
                        timer.stop(stream, m)?;
                        continue;
                    }
                    ops.batch_norm_forward(
                        mode,
                        1e-5,
                        (n * sx.rows, c),
                        &x.slice(..),
                        &master.slice(i.off..i.off + 2 * c),
                        &mut running.slice_mut(*r..*r + 2 * c),
                        res.as_ref(),
                        *relu,
                        &mut y.slice_mut(..),
                        &mut stats[v][*st],
                    )?;
                    timer.stop(stream, m)?;
                }
                Op::MaxPool { h, w } => {
                    let m = timer.start(stream, Phase::Pool)?;
                    ops.max_pool_forward(
                        (n, *h, *w, sx.c),
                        &x.slice(..),
                        &mut y.slice_mut(..),
                        &mut pool_arg[v].slice_mut(..),
                    )?;
                    timer.stop(stream, m)?;
                }
                Op::AvgPool => {
                    let m = timer.start(stream, Phase::Pool)?;
                    ops.avg_pool_forward((n, sx.rows, sx.c), &x.slice(..), &mut y.slice_mut(..))?;
                    timer.stop(stream, m)?;
                }
                Op::Linear { p, inp, out } => {
                    let i = &infos[*p];
                    let m = timer.start(stream, Phase::Linear)?;
                    ops.linear_forward(
                        *fma_only,
                        (n, *inp, *out),
                        &x.slice(..),
                        &work.slice(i.off..i.off + i.len),
                        &mut y.slice_mut(..),
                    )?;
                    timer.stop(stream, m)?;
                }
            }
        }
        Ok(())
    }

    /// One view's backward from the gradient of z in `grads`; parameter gradients accumulate
    /// into the flat f32 gradient.
    fn backward(&mut self, v: usize, n: usize, k: usize) -> Result<()> {
        let Self {
            ops,
            convs,
            acts,
            inputs,
            grads,
            work,
            master,
            grad,
            wgrad,
            stats,
            pool_arg,
            slots,
            nodes,
            infos,
            timer,
            stream,
            fma_only,
            ..
        } = self;
        for nd in nodes.iter().rev() {
            let x: &CudaSlice<A> = if nd.x == 0 {
                &inputs[k][v]
            } else {
                &acts[v][nd.x]
            };
            let yv = &acts[v][nd.y];
            let sx = slots[nd.x];
            match &nd.op {
                Op::Conv { spec, p } => {
                    let i = &infos[*p];
                    let m = timer.start(stream, Phase::Conv)?;
                    let dy = &grads[nd.y];
                    convs.backward_filter(spec, n, x, dy, wgrad, false)?;
                    ops.accumulate_into_f32(
                        &wgrad.slice(..i.len),
                        &mut grad.slice_mut(i.off..i.off + i.len),
                    )?;
                    if nd.x != 0 {
                        let (dy, dx, _) = grad_slots(grads, nd.y, nd.x, None)?;
                        convs.backward_data(
                            spec,
                            n,
                            &work.slice(i.off..i.off + i.len),
                            &*dy,
                            dx,
                            nd.acc_x,
                        )?;
                    }
                    timer.stop(stream, m)?;
                }
                Op::Norm {
                    p,
                    stats: st,
                    residual,
                    relu,
                    dense,
                    ..
                } => {
                    let i = &infos[*p];
                    let c = sx.c;
                    let m = timer.start(stream, Phase::Norm)?;
                    let gb = master.slice(i.off..i.off + 2 * c);
                    let mut dgb = grad.slice_mut(i.off..i.off + 2 * c);
                    let ys = relu.then(|| yv.slice(..));
                    let (dy, dx, dr) = grad_slots(grads, nd.y, nd.x, *residual)?;
                    if *dense {
                        ops.standardize_affine_backward(
                            (n * sx.rows, c),
                            &dy.slice(..),
                            ys.as_ref(),
                            &x.slice(..),
                            &stats[v][*st],
                            &gb,
                            &mut dgb,
                            &mut dx.slice_mut(..),
                        )?;
                    } else {
                        let mut dr = dr.map(|d| d.slice_mut(..));
                        ops.batch_norm_backward(
                            (n * sx.rows, c),
                            &dy.slice(..),
                            ys.as_ref(),
                            &x.slice(..),
                            &stats[v][*st],
                            &gb,
                            &mut dgb,
                            &mut dx.slice_mut(..),
                            dr.as_mut().map(|d| (d, nd.acc_res)),
                        )?;
                    }
                    timer.stop(stream, m)?;
                }
                Op::MaxPool { h, w } => {
                    let (dy, dx, _) = grad_slots(grads, nd.y, nd.x, None)?;
                    let m = timer.start(stream, Phase::Pool)?;
                    ops.max_pool_backward(
                        (n, *h, *w, sx.c),
                        &dy.slice(..),
                        &pool_arg[v].slice(..),
                        &mut dx.slice_mut(..),
                    )?;
                    timer.stop(stream, m)?;
                }
                Op::AvgPool => {
                    let (dy, dx, _) = grad_slots(grads, nd.y, nd.x, None)?;
                    let m = timer.start(stream, Phase::Pool)?;
                    ops.avg_pool_backward(
                        (n, sx.rows, sx.c),
                        &dy.slice(..),
                        &mut dx.slice_mut(..),
                    )?;
                    timer.stop(stream, m)?;
                }
                Op::Linear { p, inp, out } => {
                    let i = &infos[*p];
                    let (dy, dx, _) = grad_slots(grads, nd.y, nd.x, None)?;
                    let m = timer.start(stream, Phase::Linear)?;
                    let mut dxv = dx.slice_mut(..);
                    ops.linear_backward(
                        *fma_only,
                        (n, *inp, *out),
                        &x.slice(..),
                        &work.slice(i.off..i.off + i.len),
                        &dy.slice(..),
                        &mut grad.slice_mut(i.off..i.off + i.len),
                        Some((&mut dxv, nd.acc_x)),
                    )?;
                    timer.stop(stream, m)?;
                }
            }
        }
        Ok(())
    }

    /// Forward and backward of both staged views and the loss: gradients are left in the flat
    /// gradient (read them with [`DeviceTrainer::gradients_to_host`]). Reads the loss back, so
    /// it waits for the forward half of the step.
    pub fn forward_backward(&mut self) -> Result<LossValue> {
        let k = self.next;
        let staged = self.staged[k].take().ok_or_else(|| {
            Error::InvalidConfig("no batch staged: call `stage` before each step".into())
        })?;
        self.stream
            .wait(&staged)
            .map_err(drv("ordering compute after an upload"))?;
        self.next ^= 1;
        let result = self.forward_backward_on(k);
        // Also after a failure: the next upload into slot k must wait for whatever was queued
        // on it.
        let end = self
            .stream
            .record_event(None)
            .map_err(drv("recording the end of a step"));
        match end {
            Ok(e) => self.consumed[k] = Some(e),
            Err(e) => return Err(result.err().unwrap_or(e)),
        }
        result
    }

    fn forward_backward_on(&mut self, k: usize) -> Result<LossValue> {
        let n = self.batch;
        let m = self.timer.start(&self.stream, Phase::Optimizer)?;
        self.stream
            .memset_zeros(&mut self.grad)
            .map_err(drv("zeroing gradients"))?;
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
            loss.forward_backward(stream, &za[z], &zb[z], dims, &mut grads[z], dz_b)?
        };
        self.timer.stop(&self.stream, m)?;
        self.backward(0, n, k)?;
        std::mem::swap(&mut self.grads[z], &mut self.dz_b);
        let second = self.backward(1, n, k);
        std::mem::swap(&mut self.grads[z], &mut self.dz_b);
        second?;
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
            &self.grad,
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

    /// Backbone features of images `x` [n, C, H, W] in evaluation mode (running statistics),
    /// as an [n, F] tensor; batches larger than the trainer's are split.
    pub fn features(&mut self, x: &Tensor) -> Result<Tensor> {
        let (c, h, w) = self.image;
        if x.shape.len() != 4 || x.shape[1..] != [c, h, w] {
            return Err(Error::InvalidConfig(format!(
                "images of shape {:?}, the trainer was built for [n, {c}, {h}, {w}]",
                x.shape
            )));
        }
        if x.data.len() != x.shape.iter().product::<usize>() {
            return Err(Error::InvalidConfig(format!(
                "images hold {} values for shape {:?}",
                x.data.len(),
                x.shape
            )));
        }
        let k = self.next;
        if self.staged[k].is_some() {
            return Err(Error::InvalidConfig(
                "a staged batch is waiting for its step; run it before extracting features".into(),
            ));
        }
        if let Some(e) = &self.consumed[k] {
            self.stream
                .wait(e)
                .map_err(drv("ordering evaluation after a step"))?;
        }
        self.copy
            .synchronize()
            .map_err(drv("waiting for uploads"))?;
        let upto = self
            .nodes
            .iter()
            .position(|nd| nd.y == self.features_slot)
            .ok_or_else(|| internal("no feature node".into()))?
            + 1;
        let fdim = self.slots[self.features_slot].c;
        let total = x.batch();
        let item = c * h * w;
        let mut out = Vec::with_capacity(total * fdim);
        let mut host = vec![A::from_f32(0.0); self.batch * item];
        for start in (0..total).step_by(self.batch) {
            let n = self.batch.min(total - start);
            nchw_to_nhwc(&x.data[start * item..], (n, c, h, w), &mut host);
            self.stream
                .memcpy_htod(&host[..n * item], &mut self.inputs[k][0])
                .map_err(drv("uploading images"))?;
            self.forward(0, n, NormMode::Eval, k, upto)?;
            let f = self
                .stream
                .clone_dtoh(&self.acts[0][self.features_slot].slice(..n * fdim))
                .map_err(drv("reading features"))?;
            out.extend(f.into_iter().map(A::to_f32));
        }
        Ok(Tensor::from_vec(&[total, fdim], out))
    }

    fn download(&self, buf: &CudaSlice<f32>, what: &'static str) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buf).map_err(drv(what))
    }

    /// Copies the parameter gradients of the last step into the host model (CPU layout).
    pub fn gradients_to_host(&self, model: &mut BarlowTwins) -> Result<()> {
        let g = self.download(&self.grad, "reading gradients")?;
        self.scatter(model, &g, |p, v| p.grad = v)
    }

    fn scatter(
        &self,
        model: &mut BarlowTwins,
        flat: &[f32],
        mut put: impl FnMut(&mut crate::nn::Param, Vec<f32>),
    ) -> Result<()> {
        // Check the whole model first, so a mismatch leaves it untouched.
        let mut i = 0;
        let mut ok = true;
        model.params_mut(&mut |p| {
            ok &= self
                .infos
                .get(i)
                .is_some_and(|info| info.name == p.name && info.len == p.value.len());
            i += 1;
        });
        if !ok || i != self.infos.len() {
            return Err(Error::InvalidConfig(
                "the model's parameters do not match the device copy (another model?)".into(),
            ));
        }
        let mut i = 0;
        model.params_mut(&mut |p| {
            let info = &self.infos[i];
            let v = &flat[info.off..info.off + info.len];
            put(
                p,
                if info.is_conv() {
                    ohwi_to_oihw(v, &info.shape)
                } else {
                    v.to_vec()
                },
            );
            i += 1;
        });
        Ok(())
    }

    /// Copies weights, running statistics, batch counts and LARS momentum back into the host
    /// model and optimizer (for checkpoints and anything else that reads them there).
    pub fn sync_to_host(&mut self, model: &mut BarlowTwins, opt: &mut Lars) -> Result<()> {
        let w = self.download(&self.master, "reading parameters")?;
        let mom = self.download(&self.mom, "reading optimizer state")?;
        let run = self.download(&self.running, "reading running statistics")?;
        self.scatter(model, &w, |p, v| p.value = v)?;
        let mut moms = Vec::new();
        self.scatter(model, &mom, |p, v| moms.push((p.name.clone(), v)))?;
        opt.momentum = moms;
        let offsets: HashMap<&str, usize> = self
            .running_names
            .iter()
            .map(|(n, o)| (n.as_str(), *o))
            .collect();
        let forwards = std::mem::take(&mut self.forwards) as f32;
        model.buffers_mut(&mut |b| {
            let (base, part) = match b.name.rsplit_once('.') {
                Some(x) => x,
                None => return,
            };
            let Some(&off) = offsets.get(base) else {
                return;
            };
            let c = b.value.len();
            match part {
                "running_mean" => b.value.copy_from_slice(&run[off..off + c]),
                "running_var" => b.value.copy_from_slice(&run[off + c..off + 2 * c]),
                "num_batches_tracked" => b.value[0] += forwards,
                _ => {}
            }
        });
        Ok(())
    }
}

/// Everything about the device copy that the host decides: the flat parameter layout (device
/// order and layout), the running statistics, and the graph.
struct HostPlan {
    infos: Vec<ParamInfo>,
    host: Vec<f32>,
    moms: Vec<f32>,
    run_host: Vec<f32>,
    running: HashMap<String, usize>,
    slots: Vec<Slot>,
    nodes: Vec<Node>,
    feat: usize,
    z_slot: usize,
    norms: usize,
}

/// Elements between weight-tensor boundaries in the flat parameter arrays.
const WEIGHT_ALIGN: usize = 64;

fn plan(model: &mut BarlowTwins, opt: &Lars, image: (usize, usize, usize)) -> Result<HostPlan> {
    let cfg = model.config.clone();
    // Parameter table, in the model's visiting order (so a norm's β follows its γ).
    let mut infos = Vec::new();
    let mut host = Vec::new();
    let mut moms = Vec::new();
    let mut names = HashMap::new();
    let momentum: HashMap<&str, &Vec<f32>> =
        opt.momentum.iter().map(|(n, v)| (n.as_str(), v)).collect();
    model.params_mut(&mut |p| {
        // Weight matrices and filters start on a WEIGHT_ALIGN-element boundary (256 bytes of f32,
        // 128 of bf16): cuBLAS and cuDNN pick their vectorized paths by operand alignment. A norm's
        // γ and β stay adjacent (the kernels read them as one 2·C array).
        if p.shape.len() > 1 {
            let pad = host.len().next_multiple_of(WEIGHT_ALIGN) - host.len();
            host.extend(std::iter::repeat_n(0f32, pad));
            moms.extend(std::iter::repeat_n(0f32, pad));
        }
        let off = host.len();
        let conv = p.shape.len() == 4;
        let put = |v: &[f32]| {
            if conv {
                oihw_to_ohwi(v, &p.shape)
            } else {
                v.to_vec()
            }
        };
        host.extend(put(&p.value));
        match momentum.get(p.name.as_str()) {
            Some(m) if m.len() == p.value.len() => moms.extend(put(m)),
            _ => moms.extend(std::iter::repeat_n(0f32, p.value.len())),
        }
        names.insert(p.name.clone(), infos.len());
        infos.push(ParamInfo {
            name: p.name.clone(),
            shape: p.shape.clone(),
            off,
            len: p.value.len(),
        });
    });
    // Running statistics: [mean | var] per norm, by the norm's name.
    let mut run_host = Vec::new();
    let mut running = HashMap::new();
    let mut pending_mean: Option<(String, Vec<f32>)> = None;
    let mut run_err = None;
    model.buffers_mut(&mut |b| {
        if let Some(base) = b.name.strip_suffix(".running_mean") {
            pending_mean = Some((base.to_string(), b.value.clone()));
        } else if let Some(base) = b.name.strip_suffix(".running_var") {
            match pending_mean.take() {
                Some((m, mean)) if m == base => {
                    running.insert(m, run_host.len());
                    run_host.extend(mean);
                    run_host.extend_from_slice(&b.value);
                }
                _ => {
                    run_err.get_or_insert(internal(format!("{}: no running mean", b.name)));
                }
            }
        }
    });
    if let Some(e) = run_err {
        return Err(e);
    }

    // The graph.
    let (c_in, h, w) = image;
    let bb = cfg.backbone;
    let mut b = Builder {
        params: &names,
        infos: &infos,
        running: &running,
        slots: vec![Slot {
            rows: h * w,
            c: c_in,
        }],
        nodes: Vec::new(),
        norms: 0,
        hw: (h, w),
    };
    let (s, p) = match bb.stem {
        Stem::Imagenet => (2, 3),
        Stem::Small => (1, 1),
    };
    let mut x = b.conv("conv1", 0, s, p)?;
    x = b.norm("bn1", x, None, true, false)?;
    if bb.stem == Stem::Imagenet {
        let (hh, ww) = b.hw;
        let (ho, wo) = ((hh + 2 - 3) / 2 + 1, (ww + 2 - 3) / 2 + 1);
        let c = b.slots[x].c;
        let y = b.slot(ho * wo, c);
        b.push(Op::MaxPool { h: hh, w: ww }, x, y);
        b.hw = (ho, wo);
        x = y;
    }
    let (bottleneck, counts) = match bb.arch {
        Arch::Resnet18 => (false, [2, 2, 2, 2]),
        Arch::Resnet50 => (true, [3, 4, 6, 3]),
    };
    for (stage, &count) in counts.iter().enumerate() {
        for i in 0..count {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            let name = format!("layer{}.{i}", stage + 1);
            let has_ds = names.contains_key(&format!("{name}.downsample.0.weight"));
            x = b.block(&name, bottleneck, x, stride, has_ds)?;
        }
    }
    let c = b.slots[x].c;
    let feat = b.slot(1, c);
    b.push(Op::AvgPool, x, feat);
    x = feat;
    let linears = cfg.projector.len();
    for i in 0..linears {
        let wname = format!("projector.{}.weight", 3 * i);
        let p = b.param(&wname)?;
        if names.contains_key(&format!("projector.{}.bias", 3 * i)) {
            return Err(internal(format!(
                "{wname}: linear biases are not supported"
            )));
        }
        let (out, inp) = (infos[p].shape[0], infos[p].shape[1]);
        if b.slots[x].c != inp {
            return Err(internal(format!("{wname}: width mismatch")));
        }
        let y = b.slot(1, out);
        b.push(Op::Linear { p, inp, out }, x, y);
        x = y;
        if i + 1 < linears {
            x = b.norm(&format!("projector.{}", 3 * i + 1), x, None, true, true)?;
        }
    }
    let z_slot = x;
    let norms = b.norms;
    let mut nodes = b.nodes;
    let slots = b.slots;
    mark_accumulation(&mut nodes, slots.len())?;

    Ok(HostPlan {
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
    })
}

/// Walks the graph backward and marks, for each gradient contribution, whether one was written
/// before it. Nodes that can only write (norm, pooling inputs) must be their input's sole
/// consumer.
fn mark_accumulation(nodes: &mut [Node], slots: usize) -> Result<()> {
    let mut written = vec![false; slots];
    for nd in nodes.iter_mut().rev() {
        if let Op::Norm {
            residual: Some(r), ..
        } = nd.op
        {
            nd.acc_res = written[r];
            written[r] = true;
        }
        if nd.x == 0 {
            continue;
        }
        nd.acc_x = written[nd.x];
        written[nd.x] = true;
        let write_only = matches!(nd.op, Op::Norm { .. } | Op::MaxPool { .. } | Op::AvgPool);
        if write_only && nd.acc_x {
            return Err(internal(format!(
                "slot {} feeds a norm or pool and another node",
                nd.x
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::resnet::ResNetConfig;
    use crate::rng::Rng;
    use crate::train::{LarsConfig, ModelConfig};

    fn model(arch: Arch, stem: Stem, width: usize) -> BarlowTwins {
        let cfg = ModelConfig {
            backbone: ResNetConfig {
                arch,
                stem,
                in_channels: 3,
                width,
            },
            projector: vec![12, 10, 6],
            lambda: 0.0051,
        };
        BarlowTwins::new(cfg, &mut Rng::new(3)).unwrap()
    }

    /// Every parameter is read by exactly one node, every norm's running statistics by one
    /// norm, and every activation gradient is written once before anything adds to it.
    fn check_plan(m: &mut BarlowTwins, image: (usize, usize, usize)) -> HostPlan {
        let p = plan(m, &Lars::new(LarsConfig::default()), image).unwrap();
        for i in p.infos.iter().filter(|i| i.shape.len() > 1) {
            assert_eq!(i.off % WEIGHT_ALIGN, 0, "{} at element {}", i.name, i.off);
        }
        let mut used = vec![0; p.infos.len()];
        let mut runs = Vec::new();
        for nd in &p.nodes {
            match &nd.op {
                Op::Conv { p: i, .. } | Op::Linear { p: i, .. } => used[*i] += 1,
                Op::Norm { p: i, running, .. } => {
                    used[*i] += 1;
                    used[*i + 1] += 1;
                    runs.push(*running);
                }
                _ => {}
            }
        }
        assert!(
            used.iter().all(|&u| u == 1),
            "parameter use counts {used:?}"
        );
        runs.sort();
        runs.dedup();
        assert_eq!(runs.len(), p.running.len());
        assert_eq!(p.norms, p.running.len());
        // Walk backward: the first contribution to each slot writes, later ones add.
        let mut seen = vec![false; p.slots.len()];
        for nd in p.nodes.iter().rev() {
            if let Op::Norm {
                residual: Some(r), ..
            } = nd.op
            {
                assert_eq!(nd.acc_res, seen[r]);
                seen[r] = true;
            }
            if nd.x != 0 {
                assert_eq!(nd.acc_x, seen[nd.x]);
                seen[nd.x] = true;
            }
        }
        // Every slot but the input and z feeds something backward.
        for (i, s) in seen.iter().enumerate() {
            assert_eq!(*s, i != 0 && i != p.z_slot, "slot {i}");
        }
        p
    }

    #[test]
    fn graphs_use_every_parameter_once_and_write_before_adding() {
        let mut m = model(Arch::Resnet18, Stem::Small, 4);
        let p = check_plan(&mut m, (3, 8, 8));
        // The projector's two norms, and only they, run on the standardization kernel.
        let dense = p
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Norm { dense: true, .. }))
            .count();
        assert_eq!(dense, 2);
        assert_eq!(p.slots[p.feat].c, 32);
        assert_eq!(p.slots[p.z_slot].c, 6);
        // Small stem keeps 8×8, three stride-2 stages: 1×1 before the pool.
        let last_conv = p.nodes.iter().rev().find_map(|n| match n.op {
            Op::Conv { spec, .. } => Some(spec),
            _ => None,
        });
        assert_eq!(last_conv.map(|s| (s.ho(), s.wo())), Some((1, 1)));

        let mut m = model(Arch::Resnet50, Stem::Imagenet, 2);
        let p = check_plan(&mut m, (3, 32, 32));
        assert_eq!(p.slots[p.feat].c, 64);
        assert_eq!(
            p.nodes
                .iter()
                .filter(|n| matches!(n.op, Op::MaxPool { .. }))
                .count(),
            1
        );
        // 53 convolutions (49 + stem + 4 downsample... of which the stem is one), 3 linears.
        let convs = p
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Conv { .. }))
            .count();
        assert_eq!(convs, 53);
        // The first block's input (after the max-pool) feeds conv1 and the downsample conv.
        let pooled = p
            .nodes
            .iter()
            .find(|n| matches!(n.op, Op::MaxPool { .. }))
            .unwrap()
            .y;
        assert_eq!(p.nodes.iter().filter(|n| n.x == pooled).count(), 2);
    }

    #[test]
    fn weight_layouts_round_trip() {
        let shape = [3, 2, 3, 3];
        let v: Vec<f32> = (0..54).map(|i| i as f32).collect();
        let t = oihw_to_ohwi(&v, &shape);
        // Output channel 1, input channel 1, position (2, 0): OIHW index ((1·2+1)·3+2)·3+0.
        assert_eq!(t[((3 + 2) * 3) * 2 + 1], v[((2 + 1) * 3 + 2) * 3]);
        assert_eq!(ohwi_to_oihw(&t, &shape), v);
    }

    #[test]
    fn images_go_channel_last() {
        // Two images of 2 channels × 1×3 pixels.
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut out = vec![0f32; 12];
        nchw_to_nhwc(&x, (2, 2, 1, 3), &mut out);
        assert_eq!(out, vec![0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
    }
}
