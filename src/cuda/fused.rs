//! The fused loss on the GPU: five launches forward (2 standardize, 1 GEMM, 2 reduce), four more
//! backward (2 GEMMs, 2 standardize-backward), one read of three scalars. Buffers live in a
//! workspace that is kept between calls, so steady-state calls allocate nothing.

use super::ops::CudaOps;
use super::{alloc, check_context, Element};
use crate::cpu::STATS_PER_COLUMN;
use crate::error::{Error, Result};
use crate::shape::{check_input, check_output, Dims};
use crate::{LossConfig, LossValue, Math};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

/// Ẑ of both views, in the element type the GEMMs read.
enum Hat {
    F32(CudaSlice<f32>, CudaSlice<f32>),
    Bf16(CudaSlice<bf16>, CudaSlice<bf16>),
}

/// Device buffers for one (N, D, math); reused while a call fits in them.
pub(crate) struct Workspace {
    ops: CudaOps,
    ctx: usize,
    math: Math,
    cap_nd: usize,
    cap_d: usize,
    hat: Hat,
    stats_a: CudaSlice<f32>,
    stats_b: CudaSlice<f32>,
    /// C, then dL/dC in place (f32 and TF32 modes).
    c: CudaSlice<f32>,
    /// dL/dC in bf16 for the bf16 backward GEMMs (bf16 mode only).
    g16: Option<CudaSlice<bf16>>,
    dhat_a: CudaSlice<f32>,
    dhat_b: CudaSlice<f32>,
}

/// Device bytes the fused path holds for a given shape and precision (workspace plus scratch;
/// cuBLAS's own workspace comes on top).
pub fn workspace_bytes(dims: Dims, math: Math) -> usize {
    let (n, d) = (dims.n, dims.d);
    let hat = if math == Math::Bf16 { 2 } else { 4 };
    let g16 = if math == Math::Bf16 { 2 } else { 0 };
    let nd = n.saturating_mul(d);
    let dd = d.saturating_mul(d);
    // Ẑ ×2, dẐ ×2, stats ×2, C, dL/dC in bf16, scratch; saturating: a size too large to exist.
    nd.saturating_mul(2 * hat + 2 * 4)
        .saturating_add((2 * STATS_PER_COLUMN * 4).saturating_mul(d))
        .saturating_add(dd.saturating_mul(4 + g16))
        .saturating_add(CudaOps::scratch_bytes())
}

impl Workspace {
    fn new(stream: &Arc<CudaStream>, dims: Dims, math: Math) -> Result<Self> {
        let (n, d) = (dims.n, dims.d);
        let nd = n * d;
        let what = "allocating the loss workspace";
        let oom = |e: Error| match e {
            Error::OutOfDeviceMemory { during, .. } => Error::OutOfDeviceMemory {
                during,
                bytes: workspace_bytes(dims, math),
            },
            other => other,
        };
        let build = || -> Result<Self> {
            let hat = match math {
                Math::Bf16 => Hat::Bf16(alloc(stream, nd, what)?, alloc(stream, nd, what)?),
                _ => Hat::F32(alloc(stream, nd, what)?, alloc(stream, nd, what)?),
            };
            Ok(Self {
                ops: CudaOps::new(stream)?,
                ctx: stream.context().cu_ctx() as usize,
                math,
                cap_nd: nd,
                cap_d: d,
                hat,
                stats_a: alloc(stream, STATS_PER_COLUMN * d, what)?,
                stats_b: alloc(stream, STATS_PER_COLUMN * d, what)?,
                c: alloc(stream, d * d, what)?,
                g16: if math == Math::Bf16 {
                    Some(alloc(stream, d * d, what)?)
                } else {
                    None
                },
                dhat_a: alloc(stream, nd, what)?,
                dhat_b: alloc(stream, nd, what)?,
            })
        };
        build().map_err(oom)
    }

    fn fits(&self, stream: &CudaStream, dims: Dims, math: Math) -> bool {
        self.ctx == stream.context().cu_ctx() as usize
            && self.math == math
            && dims.n * dims.d <= self.cap_nd
            && dims.d <= self.cap_d
    }

    /// Returns the workspace in `slot`, (re)allocated if it does not fit this call.
    pub(crate) fn ensure<'a>(
        slot: &'a mut Option<Workspace>,
        stream: &Arc<CudaStream>,
        dims: Dims,
        math: Math,
    ) -> Result<&'a mut Workspace> {
        if !slot.as_ref().is_some_and(|w| w.fits(stream, dims, math)) {
            // Free the old buffers before asking for new ones, in their own context.
            if let Some(old) = slot.take() {
                let _ = old.ops.stream().context().bind_to_thread();
                drop(old);
            }
            *slot = Some(Workspace::new(stream, dims, math)?);
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

/// Forward pass; with `grads`, also writes dL/dZa and dL/dZb.
pub(crate) fn run<T: Element, Dz: DevicePtrMut<T>>(
    ws: &mut Workspace,
    config: &LossConfig,
    stream: &Arc<CudaStream>,
    za: &impl DevicePtr<T>,
    zb: &impl DevicePtr<T>,
    dims: Dims,
    grads: Option<(&mut Dz, &mut Dz)>,
) -> Result<LossValue> {
    let d = dims.d;
    let eps = config.eps;
    let lambda = config.lambda;
    let math = config.math;
    let Workspace {
        ops,
        hat,
        stats_a,
        stats_b,
        c,
        g16,
        dhat_a,
        dhat_b,
        ..
    } = ws;
    let nd = dims.n * d;
    let dd = d * d;
    let (mut c, mut dhat_a, mut dhat_b) = (
        c.slice_mut(..dd),
        dhat_a.slice_mut(..nd),
        dhat_b.slice_mut(..nd),
    );
    let write_grad = grads.is_some();
    ops.set_stream(stream)?;

    match hat {
        Hat::F32(ha, hb) => {
            let (mut ha, mut hb) = (ha.slice_mut(..nd), hb.slice_mut(..nd));
            ops.standardize_forward(math, za, dims, eps, &mut ha, stats_a)?;
            ops.standardize_forward(math, zb, dims, eps, &mut hb, stats_b)?;
            ops.cross_correlation(math, &ha, &hb, dims, &mut c)?;
            ops.loss_reduce_in_place(math, &mut c, d, lambda, write_grad)?;
            if write_grad {
                ops.correlation_backward(math, &c, &ha, &hb, dims, &mut dhat_a, &mut dhat_b)?;
            }
        }
        Hat::Bf16(ha, hb) => {
            let (mut ha, mut hb) = (ha.slice_mut(..nd), hb.slice_mut(..nd));
            ops.standardize_forward(math, za, dims, eps, &mut ha, stats_a)?;
            ops.standardize_forward(math, zb, dims, eps, &mut hb, stats_b)?;
            ops.cross_correlation(math, &ha, &hb, dims, &mut c)?;
            match (write_grad, g16.as_mut()) {
                (true, Some(g)) => {
                    let mut g = g.slice_mut(..dd);
                    ops.loss_reduce_bf16_grad(&c, &mut g, d, lambda)?;
                    ops.correlation_backward(math, &g, &ha, &hb, dims, &mut dhat_a, &mut dhat_b)?;
                }
                _ => ops.loss_reduce_in_place(math, &mut c, d, lambda, false)?,
            }
        }
    }
    if let Some((dza, dzb)) = grads {
        ops.standardize_backward(&dhat_a, za, stats_a, dims, dza)?;
        ops.standardize_backward(&dhat_b, zb, stats_b, dims, dzb)?;
    }
    let value = ops.read_loss()?;
    if !value.total.is_finite() {
        return Err(Error::NonFinite { total: value.total });
    }
    Ok(value)
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
