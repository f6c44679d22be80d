//! The fused loss over a batch split across GPUs, one rank each (an NCCL group): every rank gets
//! the loss of all ranks' rows and the gradient of its own, as the CPU twin
//! (`BarlowTwinsLoss::forward_backward_cpu_across`) computes them.
//!
//! Standardization: column sums, then centered squares, each all-reduced in f64 (2·D each), then
//! the statistics and Ẑ. Direct: this rank's share of C (scaled by 1/(all rows)), all-reduced
//! (D² floats), then the reduction and this rank's backward GEMMs. Gram: Ẑ all-gathered
//! (2·N·D in all), then this rank's rows of Ga and Gb against the whole batch (n×N each), their
//! share of ⟨Ga, Gb⟩ summed over the ranks, and the gradient of this rank's rows: the Gram work
//! splits by rows as on the CPU. Backward: Σ g and Σ g·x̂ all-reduced (4·D), then dz. One host read of an agreement
//! header before any work (so a refusal on one rank ends the call on all), one of the loss after.

use super::{check_context, Hat, Mats, Workspace};
use crate::cuda::nccl::{Nccl, NcclType};
use crate::cuda::ops::{rows_checked, CudaOps, GramRows};
use crate::cuda::{alloc, check_available, check_i32, drv, Element, HatElement};
use crate::error::{Error, Result};
use crate::loss::distributed::{agreement_header, check_agreement};
use crate::shape::{check_input, check_output, Dims};
use crate::Math;
use crate::{LossConfig, LossPath, LossValue};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

/// This rank's checks, before the ranks agree to go on.
fn check_local<T: Element, Dz: DevicePtrMut<T>>(
    stream: &CudaStream,
    za: &impl DevicePtr<T>,
    zb: &impl DevicePtr<T>,
    dims: Dims,
    all: Dims,
    grads: Option<&(&mut Dz, &mut Dz)>,
) -> Result<()> {
    check_available()?;
    all.checked()?;
    rows_checked(dims)?;
    check_i32("N", all.n)?;
    check_i32("D", all.d)?;
    check_input("za", za.len(), dims)?;
    check_input("zb", zb.len(), dims)?;
    check_context("za", za, stream)?;
    check_context("zb", zb, stream)?;
    if let Some((dza, dzb)) = grads {
        check_output("dza", dza.len(), dims.n * dims.d)?;
        check_output("dzb", dzb.len(), dims.n * dims.d)?;
        check_context("dza", *dza, stream)?;
        check_context("dzb", *dzb, stream)?;
    }
    Ok(())
}

/// What one call allocates besides the workspace: the column moments (sums and centered squares
/// of both views, D each), the backward's sums (4·D), and on the Gram path this rank's
/// standardized rows (in the workspace's element type) before they are gathered.
struct Scratch {
    sums: CudaSlice<f64>,
    sq: CudaSlice<f64>,
    gs: CudaSlice<f64>,
    rows: Option<Hat>,
}

impl Scratch {
    fn new(stream: &Arc<CudaStream>, dims: Dims, math: Math, path: LossPath) -> Result<Self> {
        let (d, nd) = (dims.d, dims.n * dims.d);
        let what = "allocating the distributed loss's column sums";
        let rows = if path == LossPath::Gram {
            let what = "allocating this rank's standardized rows";
            Some(if math == Math::Bf16 {
                Hat::Bf16(alloc(stream, nd, what)?, alloc(stream, nd, what)?)
            } else {
                Hat::F32(alloc(stream, nd, what)?, alloc(stream, nd, what)?)
            })
        } else {
            None
        };
        Ok(Self {
            sums: alloc(stream, 2 * d, what)?,
            sq: alloc(stream, 2 * d, what)?,
            gs: alloc(stream, 4 * d, what)?,
            rows,
        })
    }
}

/// Runs the loss on `comm`'s stream and reads the value back. `slot` is the caller's workspace
/// (reused between calls that fit it).
pub(crate) fn run<T: Element, Dz: DevicePtrMut<T>>(
    slot: &mut Option<Workspace>,
    config: &LossConfig,
    comm: &Nccl,
    za: &impl DevicePtr<T>,
    zb: &impl DevicePtr<T>,
    dims: Dims,
    mut grads: Option<(&mut Dz, &mut Dz)>,
) -> Result<LossValue> {
    let stream = comm.stream();
    let (rank, world) = (comm.rank(), comm.world_size());
    let total = dims.n.saturating_mul(world);
    let all = Dims::new(total, dims.d);
    let path = config.path.resolve_across(all, world);
    let ws_dims = if path == LossPath::Gram { all } else { dims };
    // Everything this call allocates is allocated here, before the ranks agree to go on: a rank
    // that failed later would leave the others waiting in a collective.
    let local = check_local(&stream, za, zb, dims, all, grads.as_ref())
        .and_then(|()| Workspace::ensure(slot, &stream, ws_dims, config.math, path).map(drop))
        .and_then(|()| Scratch::new(&stream, dims, config.math, path));

    // Agreement: every rank's verdict and shape, summed.
    let mut dev = stream
        .clone_htod(&agreement_header(local.is_ok(), dims))
        .map_err(drv("uploading the agreement header"))?;
    comm.all_reduce_sum_f64(&mut dev)?;
    let h = stream
        .clone_dtoh(&dev)
        .map_err(drv("reading the agreement header"))?;
    let Scratch {
        mut sums,
        mut sq,
        mut gs,
        mut rows,
    } = local?;
    check_agreement(&h, dims, rank, world)?;
    let ws = slot.as_mut().ok_or_else(|| Error::Cuda {
        during: "the distributed loss".into(),
        message: "workspace missing after allocation".into(),
    })?;
    ws.ops.set_stream(&stream)?;
    let (d, nd) = (dims.d, dims.n * dims.d);

    // The whole batch's column statistics.
    ws.ops.column_sums(za, dims, &mut sums.slice_mut(..d))?;
    ws.ops.column_sums(zb, dims, &mut sums.slice_mut(d..))?;
    comm.all_reduce_sum_f64(&mut sums)?;
    let (sa, sb) = (sums.slice(..d), sums.slice(d..));
    ws.ops
        .centered_squares(za, dims, &sa, total, &mut sq.slice_mut(..d))?;
    ws.ops
        .centered_squares(zb, dims, &sb, total, &mut sq.slice_mut(d..))?;
    comm.all_reduce_sum_f64(&mut sq)?;
    let moments = Moments {
        sums: &sums,
        sq: &sq,
        total,
    };

    let write_grad = grads.is_some();
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
    let mut bufs = Bufs {
        ops,
        stats_a,
        stats_b,
        mats,
        dhat_a,
        dhat_b,
    };
    let ctx = Ctx {
        config,
        comm,
        dims,
        moments,
        write_grad,
    };
    match (hat, rows.as_mut()) {
        (Hat::F32(ha, hb), None) => forward(&ctx, za, zb, ha, hb, None, &mut bufs)?,
        (Hat::F32(ha, hb), Some(Hat::F32(la, lb))) => {
            forward(&ctx, za, zb, ha, hb, Some((la, lb)), &mut bufs)?
        }
        (Hat::Bf16(ha, hb), None) => forward(&ctx, za, zb, ha, hb, None, &mut bufs)?,
        (Hat::Bf16(ha, hb), Some(Hat::Bf16(la, lb))) => {
            forward(&ctx, za, zb, ha, hb, Some((la, lb)), &mut bufs)?
        }
        _ => {
            return Err(Error::Cuda {
                during: "the distributed loss".into(),
                message: "this rank's rows and the workspace hold different types".into(),
            })
        }
    }
    // dL/dẐ of this rank's rows, on either path.
    if let Some((dza, dzb)) = grads.as_mut() {
        let ops = &*bufs.ops;
        let (ga, gb) = (bufs.dhat_a.slice(..nd), bufs.dhat_b.slice(..nd));
        ops.std_bwd_sums(&ga, za, &*bufs.stats_a, dims, &mut gs.slice_mut(..2 * d))?;
        ops.std_bwd_sums(&gb, zb, &*bufs.stats_b, dims, &mut gs.slice_mut(2 * d..))?;
        comm.all_reduce_sum_f64(&mut gs)?;
        let (sa, sb) = (gs.slice(..2 * d), gs.slice(2 * d..));
        ops.std_bwd_apply(&ga, za, &*bufs.stats_a, &sa, total, dims, *dza)?;
        ops.std_bwd_apply(&gb, zb, &*bufs.stats_b, &sb, total, dims, *dzb)?;
    }
    ws.read()
}

/// The whole batch's summed column sums and centered squares ([view a | view b], D each).
#[derive(Clone, Copy)]
struct Moments<'a> {
    sums: &'a CudaSlice<f64>,
    sq: &'a CudaSlice<f64>,
    total: usize,
}

/// What every stage of one call reads.
struct Ctx<'a> {
    config: &'a LossConfig,
    comm: &'a Nccl,
    dims: Dims,
    moments: Moments<'a>,
    write_grad: bool,
}

/// The workspace's buffers besides Ẑ.
struct Bufs<'a> {
    ops: &'a mut CudaOps,
    stats_a: &'a mut CudaSlice<f32>,
    stats_b: &'a mut CudaSlice<f32>,
    mats: &'a mut Mats,
    dhat_a: &'a mut CudaSlice<f32>,
    dhat_b: &'a mut CudaSlice<f32>,
}

/// Standardization with the whole batch's statistics, then the loss by the workspace's path,
/// leaving dL/dẐ in the workspace when asked.
fn forward<T: Element, O: DirectGrad>(
    c: &Ctx<'_>,
    za: &impl DevicePtr<T>,
    zb: &impl DevicePtr<T>,
    ha: &mut CudaSlice<O>,
    hb: &mut CudaSlice<O>,
    rows: Option<(&mut CudaSlice<O>, &mut CudaSlice<O>)>,
    b: &mut Bufs<'_>,
) -> Result<()> {
    let (dims, m) = (c.dims, c.moments);
    let (n, d) = (dims.n, dims.d);
    let nd = n * d;
    let (math, eps, lambda) = (c.config.math, c.config.eps, c.config.lambda);
    let (sa, sb) = (m.sums.slice(..d), m.sums.slice(d..));
    let (qa, qb) = (m.sq.slice(..d), m.sq.slice(d..));
    let inv_total = 1.0 / m.total as f32;
    match b.mats {
        Mats::Direct { c: cm, g16 } => {
            let (mut la, mut lb) = (ha.slice_mut(..nd), hb.slice_mut(..nd));
            let ops = &mut *b.ops;
            ops.standardize_apply(math, za, dims, (&sa, &qa, m.total), eps, b.stats_a, &mut la)?;
            ops.standardize_apply(math, zb, dims, (&sb, &qb, m.total), eps, b.stats_b, &mut lb)?;
            let mut cm = cm.slice_mut(..d * d);
            ops.cross_correlation_scaled(math, &la, &lb, dims, inv_total, &mut cm)?;
            c.comm.all_reduce_sum_f32(&mut cm)?;
            let (mut da, mut db) = (b.dhat_a.slice_mut(..nd), b.dhat_b.slice_mut(..nd));
            if c.write_grad {
                let s = inv_total;
                let (la, lb) = (la.slice(..), lb.slice(..));
                O::reduce_and_backward(
                    ops,
                    math,
                    lambda,
                    &mut cm,
                    g16,
                    (&la, &lb, dims, s),
                    (&mut da, &mut db),
                )?;
            } else {
                ops.loss_reduce_in_place(math, &mut cm, d, lambda, false)?;
            }
        }
        Mats::Gram { ga, gb, g16 } => {
            // This rank's Ẑ, gathered into the workspace's whole-batch Ẑ.
            let (la, lb) = rows.ok_or_else(|| Error::Cuda {
                during: "the distributed loss".into(),
                message: "no buffers for this rank's standardized rows".into(),
            })?;
            let ops = &mut *b.ops;
            ops.standardize_apply(math, za, dims, (&sa, &qa, m.total), eps, b.stats_a, la)?;
            ops.standardize_apply(math, zb, dims, (&sb, &qb, m.total), eps, b.stats_b, lb)?;
            let all = Dims::new(m.total, d);
            let total_nd = m.total * d;
            let (mut fa, mut fb) = (ha.slice_mut(..total_nd), hb.slice_mut(..total_nd));
            c.comm.all_gather(&*la, &mut fa)?;
            c.comm.all_gather(&*lb, &mut fb)?;
            // This rank's rows of Ga and Gb against the whole batch; ⟨Ga, Gb⟩ summed over the
            // ranks; the gradient of this rank's rows.
            let block = n * m.total;
            let (mut ga, mut gb) = (ga.slice_mut(..block), gb.slice_mut(..block));
            ops.gram_rows(math, &*la, n, &fa, all, &mut ga)?;
            ops.gram_rows(math, &*lb, n, &fb, all, &mut gb)?;
            let grads = c.write_grad.then_some((&mut *b.dhat_a, &mut *b.dhat_b));
            let g16 = g16.as_mut().map(|(x, y)| (x, y));
            let mut sum = |p: &mut CudaViewMut<'_, f64>| c.comm.all_reduce_sum_f64(p);
            let rows = GramRows {
                za: &*la,
                zb: &*lb,
                n,
                sum: Some(&mut sum),
            };
            ops.gram_loss_rows(
                math, rows, &fa, &fb, &mut ga, &mut gb, all, lambda, grads, g16,
            )?;
        }
    }
    Ok(())
}

/// The Direct path's reduction and backward GEMMs for Ẑ of one element type: the GEMMs read
/// dL/dC in the type of Ẑ (written over C in f32, beside it in bf16).
trait DirectGrad: HatElement + NcclType {
    #[allow(clippy::type_complexity)]
    fn reduce_and_backward(
        ops: &mut CudaOps,
        math: Math,
        lambda: f32,
        c: &mut CudaViewMut<'_, f32>,
        g16: &mut Option<CudaSlice<bf16>>,
        x: (&CudaView<'_, Self>, &CudaView<'_, Self>, Dims, f32),
        out: (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>),
    ) -> Result<()>;
}

impl DirectGrad for f32 {
    fn reduce_and_backward(
        ops: &mut CudaOps,
        math: Math,
        lambda: f32,
        c: &mut CudaViewMut<'_, f32>,
        _: &mut Option<CudaSlice<bf16>>,
        (la, lb, dims, s): (&CudaView<'_, f32>, &CudaView<'_, f32>, Dims, f32),
        (da, db): (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>),
    ) -> Result<()> {
        ops.loss_reduce_in_place(math, c, dims.d, lambda, true)?;
        ops.correlation_backward_scaled(math, &*c, la, lb, dims, s, da, db)
    }
}

impl DirectGrad for bf16 {
    fn reduce_and_backward(
        ops: &mut CudaOps,
        math: Math,
        lambda: f32,
        c: &mut CudaViewMut<'_, f32>,
        g16: &mut Option<CudaSlice<bf16>>,
        (la, lb, dims, s): (&CudaView<'_, bf16>, &CudaView<'_, bf16>, Dims, f32),
        (da, db): (&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>),
    ) -> Result<()> {
        let d = dims.d;
        let g = g16.as_mut().ok_or_else(|| Error::Cuda {
            during: "the distributed loss".into(),
            message: "no bf16 gradient buffer in a bf16 workspace".into(),
        })?;
        let mut g = g.slice_mut(..d * d);
        ops.loss_reduce_bf16_grad(&*c, &mut g, d, lambda)?;
        ops.correlation_backward_scaled(math, &g, la, lb, dims, s, da, db)
    }
}
