//! Data parallelism on the CPU engine, across the ranks of a [`Collective`] group: the reference
//! the device engine is held to. Each rank runs the model on its share of the batch; batch norm is
//! synchronized (every layer's statistics span all ranks' rows, as the reference recipe converts
//! the model's batch norms), the loss is the whole batch's
//! ([`crate::BarlowTwinsLoss::forward_backward_cpu_across`]), and the parameter gradients are
//! summed over the ranks, so W ranks of N images take the step one rank takes on W·N images.

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::nn::{batch_norm_grad_sums, batch_norm_input_grad, channel_stats};
use crate::nn::{Backend, ConvSpec};
use std::sync::Mutex;

/// A backend whose batch statistics span every rank of `group`: the sums behind each batch
/// norm's mean and variance (forward) and behind its input gradient (backward) are summed over
/// the ranks; everything else is `inner`'s. Every rank must run the same layers on batches of
/// the same shape. The backend's methods cannot fail, so a failed collective is kept and
/// returned by [`SyncBackend::finish`] (the values computed after it are not to be used).
pub struct SyncBackend<'a> {
    inner: &'a dyn Backend,
    group: &'a dyn Collective,
    error: Mutex<Option<Error>>,
}

impl<'a> SyncBackend<'a> {
    /// Synchronizes `inner`'s batch norms over `group`.
    pub fn new(inner: &'a dyn Backend, group: &'a dyn Collective) -> Self {
        Self {
            inner,
            group,
            error: Mutex::new(None),
        }
    }

    /// The first collective error, if any.
    pub fn finish(self) -> Result<()> {
        match self.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn sum(&self, buf: &mut [f64]) {
        let mut err = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if err.is_some() {
            buf.iter_mut().for_each(|v| *v = f64::NAN);
            return;
        }
        if let Err(e) = self.group.all_reduce_sum_f64(buf) {
            buf.iter_mut().for_each(|v| *v = f64::NAN);
            *err = Some(e);
        }
    }
}

impl Backend for SyncBackend<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn stat_batches(&self) -> usize {
        self.group.world_size()
    }

    fn conv2d_forward(
        &self,
        spec: &ConvSpec,
        n: usize,
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        moments: Option<&mut [f32]>,
    ) {
        self.inner.conv2d_forward(spec, n, x, w, y, moments)
    }

    fn conv2d_backward(
        &self,
        spec: &ConvSpec,
        n: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        self.inner.conv2d_backward(spec, n, x, w, dy, dx, dw)
    }

    fn linear_forward(
        &self,
        n: usize,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        y: &mut [f32],
        out: usize,
    ) {
        self.inner.linear_forward(n, x, w, b, y, out)
    }

    fn linear_backward(
        &self,
        n: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        out: usize,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) {
        self.inner.linear_backward(n, x, w, dy, out, dx, dw, db)
    }

    /// The CPU backend's statistics, the sums of each of its two steps added over the ranks.
    fn channel_stats(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        moments: Option<&[f32]>,
        mean: &mut [f32],
        var: &mut [f32],
    ) {
        let m = (n * hw * self.group.world_size()) as f64;
        channel_stats(n, c, hw, x, moments, m, &|s| self.sum(s), mean, var);
    }

    fn norm_apply(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        stats: (&[f32], &[f32]),
        affine: (&[f32], &[f32]),
        residual: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) {
        self.inner
            .norm_apply(n, c, hw, x, stats, affine, residual, relu, y)
    }

    /// dγ and dβ are this rank's sums (the gradients are summed over the ranks afterwards); dx
    /// takes the means of dy and dy·x̂ over every rank's rows.
    fn batch_norm_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        stats: (&[f32], &[f32]),
        gamma: &[f32],
        relu_out: Option<&[f32]>,
        dy: &mut [f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let mut sums = batch_norm_grad_sums(n, c, hw, x, stats, relu_out, dy);
        for ch in 0..c {
            dbeta[ch] += sums[2 * ch] as f32;
            dgamma[ch] += sums[2 * ch + 1] as f32;
        }
        self.sum(&mut sums);
        let m = (n * hw * self.group.world_size()) as f64;
        batch_norm_input_grad(n, c, hw, &sums, m, x, stats, gamma, dy, dx);
    }
}
