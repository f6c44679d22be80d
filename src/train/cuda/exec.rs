//! Forward and backward execution of the device plan, and evaluation-mode features.

use super::layout::nchw_to_nhwc;
use super::plan::{internal, Op};
use super::timing::Phase;
use super::DeviceTrainer;
use crate::cuda::nn::{NormBackward, NormForward, NormMode};
use crate::cuda::{drv, Act};
use crate::error::{Error, Result};
use crate::nn::Tensor;
use cudarc::driver::CudaSlice;

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

impl<A: Act> DeviceTrainer<A> {
    /// One view's forward through the first `upto` nodes, reading the input from staging
    /// buffer `k`.
    pub(super) fn forward(
        &mut self,
        v: usize,
        n: usize,
        mode: NormMode,
        k: usize,
        upto: usize,
    ) -> Result<()> {
        let Self {
            ops,
            convs,
            acts,
            staging,
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
            group,
            ..
        } = self;
        for nd in &nodes[..upto] {
            let (lo, hi) = acts[v].split_at_mut(nd.y);
            let y = &mut hi[0];
            let x: &CudaSlice<A> = if nd.x == 0 {
                &staging.inputs[k][v]
            } else {
                &lo[nd.x]
            };
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
                    let args = NormForward {
                        rows: n * sx.rows,
                        c,
                        eps: 1e-5,
                        relu: *relu,
                        x: x.slice(..),
                        gb: master.slice(i.off..i.off + 2 * c),
                        running: running.slice_mut(*r..*r + 2 * c),
                        residual: residual.map(|r| lo[r].slice(..)),
                        y: y.slice_mut(..),
                        stats: &mut stats[v][*st],
                    };
                    let m = timer.start(stream, Phase::Norm)?;
                    match (group.as_ref(), *dense, mode) {
                        // Across ranks every norm, the projector's too, is synchronized.
                        (Some(comm), _, NormMode::Train { momentum }) => {
                            ops.batch_norm_forward_sync(comm, momentum, args)?
                        }
                        (None, true, NormMode::Train { momentum }) => {
                            ops.standardize_affine_forward(momentum, args)?
                        }
                        _ => ops.batch_norm_forward(mode, args)?,
                    }
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
    pub(super) fn backward(&mut self, v: usize, n: usize, k: usize) -> Result<()> {
        let Self {
            ops,
            convs,
            acts,
            staging,
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
            group,
            ..
        } = self;
        // The second view's backward runs last: it finishes each parameter's gradient.
        let reduce = if v == 1 { group.as_ref() } else { None };
        for (at, nd) in nodes.iter().enumerate().rev() {
            let x: &CudaSlice<A> = if nd.x == 0 {
                &staging.inputs[k][v]
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
                        &mut grad.range_mut(i.off, i.len)?,
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
                    let (dy, dx, dr) = grad_slots(grads, nd.y, nd.x, *residual)?;
                    let args = NormBackward {
                        rows: n * sx.rows,
                        c,
                        dy: dy.slice(..),
                        y: relu.then(|| yv.slice(..)),
                        x: x.slice(..),
                        stats: &stats[v][*st],
                        gb: master.slice(i.off..i.off + 2 * c),
                        dgb: grad.range_mut(i.off, 2 * c)?,
                        dx: dx.slice_mut(..),
                        dres: dr.map(|d| (d.slice_mut(..), nd.acc_res)),
                    };
                    let m = timer.start(stream, Phase::Norm)?;
                    if let Some(comm) = group.as_ref() {
                        ops.batch_norm_backward_sync(comm, args)?;
                    } else if *dense {
                        ops.standardize_affine_backward(args)?;
                    } else {
                        ops.batch_norm_backward(args)?;
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
                        &mut grad.range_mut(i.off, i.len)?,
                        Some((&mut dxv, nd.acc_x)),
                    )?;
                    timer.stop(stream, m)?;
                }
            }
            if let Some(comm) = reduce {
                for b in grad.completed_at(at).to_vec() {
                    grad.reduce(b, comm, stream)?;
                }
            }
        }
        Ok(())
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
        let k = self.staging.next;
        if self.staging.staged[k].is_some() {
            return Err(Error::InvalidConfig(
                "a staged batch is waiting for its step; run it before extracting features".into(),
            ));
        }
        if let Some(e) = &self.staging.consumed[k] {
            self.stream
                .wait(e)
                .map_err(drv("ordering evaluation after a step"))?;
        }
        self.staging
            .copy
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
                .memcpy_htod(&host[..n * item], &mut self.staging.inputs[k][0])
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
}
