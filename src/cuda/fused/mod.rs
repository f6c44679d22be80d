//! The fused loss on the GPU, by either path.
//!
//! Direct: five launches forward (2 standardize, 1 GEMM, 2 reduce), four more backward (2 GEMMs,
//! 2 standardize-backward). Gram: two Gram GEMMs and four small kernels forward, two init kernels
//! and two GEMMs backward, then the same standardize-backward. One read of three scalars either
//! way. Buffers live in a workspace kept between calls, so steady-state calls allocate nothing.

#[cfg(feature = "nccl")]
pub(crate) mod across;

use super::ops::CudaOps;
use super::{alloc, check_context, Element};
use crate::cpu::STATS_PER_COLUMN;
use crate::error::{Error, Result};
use crate::shape::{check_input, check_output, Dims};
use crate::{LossConfig, LossPath, LossValue, Math};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

/// Ẑ of both views, in the element type the GEMMs read.
enum Hat {
    F32(CudaSlice<f32>, CudaSlice<f32>),
    Bf16(CudaSlice<bf16>, CudaSlice<bf16>),
}

/// The matrices of one path.
enum Mats {
    /// C, then dL/dC in place (f32, TF32); dL/dC in bf16 for the bf16 backward GEMMs.
    Direct {
        c: CudaSlice<f32>,
        g16: Option<CudaSlice<bf16>>,
    },
    /// Ga, Gb (f32), and their bf16 copies for the bf16 gradient GEMMs.
    Gram {
        ga: CudaSlice<f32>,
        gb: CudaSlice<f32>,
        g16: Option<(CudaSlice<bf16>, CudaSlice<bf16>)>,
    },
}

/// Makes its context current when dropped, so the buffers declared after it are freed there (a
/// loss object may be dropped on any thread, after work on any device).
struct BindOnDrop(Arc<cudarc::driver::CudaContext>);

impl Drop for BindOnDrop {
    fn drop(&mut self) {
        let _ = self.0.bind_to_thread();
    }
}

/// Device buffers for one (N, D, math, path); reused while a call fits in them. The kernels and
/// the cuBLAS handle (`ops`) outlive a resize: destroying a handle synchronizes the device.
pub(crate) struct Workspace {
    /// First, so it is dropped before the buffers.
    _bind: BindOnDrop,
    ops: CudaOps,
    ctx: usize,
    math: Math,
    path: LossPath,
    cap_n: usize,
    cap_d: usize,
    hat: Hat,
    stats_a: CudaSlice<f32>,
    stats_b: CudaSlice<f32>,
    mats: Mats,
    dhat_a: CudaSlice<f32>,
    dhat_b: CudaSlice<f32>,
}

/// Device bytes the fused loss holds for a shape, precision and path (workspace plus scratch;
/// cuBLAS's own workspace comes on top). Saturating: a size too large to exist stays huge.
pub fn workspace_bytes(dims: Dims, math: Math, path: LossPath) -> usize {
    let (n, d) = (dims.n, dims.d);
    let bf = math == Math::Bf16;
    let hat = if bf { 2 } else { 4 };
    let half_copy = if bf { 2 } else { 0 };
    let nd = n.saturating_mul(d);
    // Ẑ ×2, dẐ ×2, stats ×2, scratch.
    let common = nd
        .saturating_mul(2 * hat + 2 * 4)
        .saturating_add((2 * STATS_PER_COLUMN * 4).saturating_mul(d))
        .saturating_add(CudaOps::scratch_bytes());
    let mats = match path.resolve(dims) {
        LossPath::Gram => n
            .saturating_mul(n)
            .saturating_mul(2 * (4 + half_copy))
            .saturating_add(12 * d),
        _ => d.saturating_mul(d).saturating_mul(4 + half_copy),
    };
    common.saturating_add(mats)
}

impl Workspace {
    /// New buffers for the shape; `ops` is the previous workspace's on this context, kept.
    fn new(
        stream: &Arc<CudaStream>,
        dims: Dims,
        math: Math,
        path: LossPath,
        ops: Option<CudaOps>,
    ) -> Result<Self> {
        let (n, d) = (dims.n, dims.d);
        let nd = n * d;
        let what = "allocating the loss workspace";
        let oom = |e: Error| match e {
            Error::OutOfDeviceMemory { during, .. } => Error::OutOfDeviceMemory {
                during,
                bytes: workspace_bytes(dims, math, path),
            },
            other => other,
        };
        let bf = math == Math::Bf16;
        let ops = match ops {
            Some(mut ops) => {
                ops.set_stream(stream)?;
                ops
            }
            None => CudaOps::new(stream)?,
        };
        let build = move || -> Result<Self> {
            let hat = if bf {
                Hat::Bf16(alloc(stream, nd, what)?, alloc(stream, nd, what)?)
            } else {
                Hat::F32(alloc(stream, nd, what)?, alloc(stream, nd, what)?)
            };
            let mats = match path {
                LossPath::Gram => Mats::Gram {
                    ga: alloc(stream, n * n, what)?,
                    gb: alloc(stream, n * n, what)?,
                    g16: if bf {
                        Some((alloc(stream, n * n, what)?, alloc(stream, n * n, what)?))
                    } else {
                        None
                    },
                },
                _ => Mats::Direct {
                    c: alloc(stream, d * d, what)?,
                    g16: if bf {
                        Some(alloc(stream, d * d, what)?)
                    } else {
                        None
                    },
                },
            };
            Ok(Self {
                _bind: BindOnDrop(stream.context().clone()),
                ops,
                ctx: stream.context().cu_ctx() as usize,
                math,
                path,
                cap_n: n,
                cap_d: d,
                hat,
                stats_a: alloc(stream, STATS_PER_COLUMN * d, what)?,
                stats_b: alloc(stream, STATS_PER_COLUMN * d, what)?,
                mats,
                dhat_a: alloc(stream, nd, what)?,
                dhat_b: alloc(stream, nd, what)?,
            })
        };
        build().map_err(oom)
    }

    fn fits(&self, stream: &CudaStream, dims: Dims, math: Math, path: LossPath) -> bool {
        // Buffers are used as prefixes: N×D and N×N or D×D must fit their allocations.
        self.ctx == stream.context().cu_ctx() as usize
            && self.math == math
            && self.path == path
            && dims.n * dims.d <= self.cap_n * self.cap_d
            && dims.d <= self.cap_d
            && (path != LossPath::Gram || dims.n <= self.cap_n)
    }

    /// Returns the workspace in `slot`, (re)allocated if it does not fit this call.
    pub(crate) fn ensure<'a>(
        slot: &'a mut Option<Workspace>,
        stream: &Arc<CudaStream>,
        dims: Dims,
        math: Math,
        path: LossPath,
    ) -> Result<&'a mut Workspace> {
        if !slot
            .as_ref()
            .is_some_and(|w| w.fits(stream, dims, math, path))
        {
            use cudarc::driver::sys::CUstreamCaptureStatus;
            let capturing = stream
                .capture_status()
                .map_err(super::drv("asking whether the stream is capturing"))?;
            if capturing != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                return Err(Error::InvalidConfig(format!(
                    "the loss needs a larger workspace (N = {}, D = {}, {math:?}, {path:?}) while \
                     its stream is capturing a CUDA graph; run the loss once at this shape before \
                     capturing",
                    dims.n, dims.d
                )));
            }
            // Free the old buffers before asking for new ones; keep the kernels and the cuBLAS
            // handle when the context is the same.
            let ctx = stream.context().cu_ctx() as usize;
            let ops = match slot.take() {
                Some(old) if old.ctx == ctx => {
                    let Workspace { ops, .. } = old;
                    Some(ops)
                }
                _ => None,
            };
            *slot = Some(Workspace::new(stream, dims, math, path, ops)?);
        }
        match slot.as_mut() {
            Some(w) => Ok(w),
            None => Err(Error::Cuda {
                during: "allocating the loss workspace".into(),
                message: "workspace missing after allocation".into(),
            }),
        }
    }
}

/// Checks every caller buffer before any work is queued.
pub(crate) fn check_inputs<T: Element>(
    stream: &CudaStream,
    za: &impl DevicePtr<T>,
    zb: &impl DevicePtr<T>,
    dims: Dims,
) -> Result<()> {
    dims.checked()?;
    super::check_i32("N", dims.n)?;
    super::check_i32("D", dims.d)?;
    check_input("za", za.len(), dims)?;
    check_input("zb", zb.len(), dims)?;
    check_context("za", za, stream)?;
    check_context("zb", zb, stream)?;
    Ok(())
}

/// Queues the forward pass by `path` (resolved); with `grads`, also dL/dZa and dL/dZb. The loss
/// lands in the workspace's scratch: read it with [`Workspace::read`] (waits) or copy it to the
/// device with [`Workspace::publish`] (does not).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<T: Element, Dz: DevicePtrMut<T>>(
    ws: &mut Workspace,
    config: &LossConfig,
    stream: &Arc<CudaStream>,
    za: &impl DevicePtr<T>,
    zb: &impl DevicePtr<T>,
    dims: Dims,
    grads: Option<(&mut Dz, &mut Dz)>,
) -> Result<()> {
    let (n, d) = (dims.n, dims.d);
    let (eps, lambda, math) = (config.eps, config.lambda, config.math);
    let Workspace {
        ops,
        hat,
        stats_a,
        stats_b,
        mats,
        dhat_a,
        dhat_b,
        ..
    } = ws;

    let (nd, dd) = (n * d, d * d);
    let write_grad = grads.is_some();
    ops.set_stream(stream)?;

    match (hat, mats) {
        (Hat::F32(ha, hb), Mats::Direct { c, .. }) => {
            let (mut ha, mut hb) = (ha.slice_mut(..nd), hb.slice_mut(..nd));
            ops.standardize_forward(math, za, dims, eps, &mut ha, stats_a)?;
            ops.standardize_forward(math, zb, dims, eps, &mut hb, stats_b)?;
            let mut c = c.slice_mut(..dd);
            ops.cross_correlation(math, &ha, &hb, dims, &mut c)?;
            ops.loss_reduce_in_place(math, &mut c, d, lambda, write_grad)?;
            if write_grad {
                let (mut da, mut db) = (dhat_a.slice_mut(..nd), dhat_b.slice_mut(..nd));
                ops.correlation_backward(math, &c, &ha, &hb, dims, &mut da, &mut db)?;
            }
        }
        (Hat::Bf16(ha, hb), Mats::Direct { c, g16 }) => {
            let (mut ha, mut hb) = (ha.slice_mut(..nd), hb.slice_mut(..nd));
            ops.standardize_forward(math, za, dims, eps, &mut ha, stats_a)?;
            ops.standardize_forward(math, zb, dims, eps, &mut hb, stats_b)?;
            let mut c = c.slice_mut(..dd);
            ops.cross_correlation(math, &ha, &hb, dims, &mut c)?;
            match (write_grad, g16.as_mut()) {
                (true, Some(g)) => {
                    let mut g = g.slice_mut(..dd);
                    ops.loss_reduce_bf16_grad(&c, &mut g, d, lambda)?;
                    let (mut da, mut db) = (dhat_a.slice_mut(..nd), dhat_b.slice_mut(..nd));
                    ops.correlation_backward(math, &g, &ha, &hb, dims, &mut da, &mut db)?;
                }
                _ => ops.loss_reduce_in_place(math, &mut c, d, lambda, false)?,
            }
        }
        (hat, Mats::Gram { ga, gb, g16 }) => {
            let bufs = GramBufs {
                ga,
                gb,
                g16,
                dhat_a,
                dhat_b,
                stats_a,
                stats_b,
            };
            match hat {
                Hat::F32(ha, hb) => gram_path(ops, config, za, zb, ha, hb, bufs, dims, write_grad)?,
                Hat::Bf16(ha, hb) => {
                    gram_path(ops, config, za, zb, ha, hb, bufs, dims, write_grad)?
                }
            }
        }
    }
    if let Some((dza, dzb)) = grads {
        let (da, db) = (dhat_a.slice(..nd), dhat_b.slice(..nd));
        ops.standardize_backward(&da, za, stats_a, dims, dza)?;
        ops.standardize_backward(&db, zb, stats_b, dims, dzb)?;
    }
    Ok(())
}

impl Workspace {
    /// Waits for the stream and returns the loss of the last [`run`]; a non-finite loss is
    /// [`Error::NonFinite`].
    pub(crate) fn read(&self) -> Result<LossValue> {
        let value = self.ops.read_loss()?.via(self.path);
        if !value.total.is_finite() {
            return Err(Error::NonFinite { total: value.total });
        }
        Ok(value)
    }

    /// Copies the loss of the last [`run`] into `dst` on the stream, without waiting.
    pub(crate) fn publish(&self, dst: &mut impl DevicePtrMut<f32>) -> Result<()> {
        self.ops.publish_loss(dst)
    }
}

/// The Gram path's buffers, borrowed from the workspace.
struct GramBufs<'a> {
    ga: &'a mut CudaSlice<f32>,
    gb: &'a mut CudaSlice<f32>,
    g16: &'a mut Option<(CudaSlice<bf16>, CudaSlice<bf16>)>,
    dhat_a: &'a mut CudaSlice<f32>,
    dhat_b: &'a mut CudaSlice<f32>,
    stats_a: &'a mut CudaSlice<f32>,
    stats_b: &'a mut CudaSlice<f32>,
}

/// Standardization, the two Gram GEMMs and the Gram reductions (and gradients), for Ẑ of type O.
#[allow(clippy::too_many_arguments)]
fn gram_path<T: Element, O: super::HatElement>(
    ops: &mut CudaOps,
    config: &LossConfig,
    za: &impl DevicePtr<T>,
    zb: &impl DevicePtr<T>,
    ha: &mut CudaSlice<O>,
    hb: &mut CudaSlice<O>,
    b: GramBufs<'_>,
    dims: Dims,
    write_grad: bool,
) -> Result<()> {
    let (n, d) = (dims.n, dims.d);
    let (nd, nn) = (n * d, n * n);
    let math = config.math;
    let (mut ha, mut hb) = (ha.slice_mut(..nd), hb.slice_mut(..nd));
    ops.standardize_forward(math, za, dims, config.eps, &mut ha, b.stats_a)?;
    ops.standardize_forward(math, zb, dims, config.eps, &mut hb, b.stats_b)?;
    let (mut ga, mut gb) = (b.ga.slice_mut(..nn), b.gb.slice_mut(..nn));
    ops.gram(math, &ha, dims, &mut ga)?;
    ops.gram(math, &hb, dims, &mut gb)?;
    let grads = write_grad.then_some((b.dhat_a, b.dhat_b));
    let g16 = b.g16.as_mut().map(|(x, y)| (x, y));
    ops.gram_loss(
        math,
        &ha,
        &hb,
        &mut ga,
        &mut gb,
        dims,
        config.lambda,
        grads,
        g16,
    )
}

/// Validates gradient buffers against the inputs.
pub(crate) fn check_grads<T>(
    stream: &CudaStream,
    dza: &impl DevicePtrMut<T>,
    dzb: &impl DevicePtrMut<T>,
    dims: Dims,
) -> Result<()> {
    check_output("dza", dza.len(), dims.n * dims.d)?;
    check_output("dzb", dzb.len(), dims.n * dims.d)?;
    check_context("dza", dza, stream)?;
    check_context("dzb", dzb, stream)?;
    Ok(())
}
