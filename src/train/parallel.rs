//! Data parallelism on the CPU engine, across the ranks of a [`Collective`] group: the reference
//! the device engine is held to. Each rank runs the model on its share of the batch; batch norm is
//! synchronized (every layer's statistics span all ranks' rows, as the reference recipe converts
//! the model's batch norms), the loss is the whole batch's
//! ([`crate::BarlowTwinsLoss::forward_backward_cpu_across`]), and the parameter gradients are
//! summed over the ranks, so W ranks of N images take the step one rank takes on W·N images.

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::nn::{batch_norm_grad_sums, batch_norm_input_grad};
use crate::nn::{Backend, ConvSpec};
use rayon::prelude::*;
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

/// Per-channel Σ f(x) over the planes of x [n, c, hw]: short f32 sums per plane, f64 across.
fn channel_sums(
    n: usize,
    c: usize,
    hw: usize,
    x: &[f32],
    f: impl Fn(usize, f32) -> f32 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..n)
                .map(|i| {
                    let plane = &x[(i * c + ch) * hw..][..hw];
                    f64::from(plane.iter().map(|&v| f(ch, v)).sum::<f32>())
                })
                .sum()
        })
        .collect()
}

impl Backend for SyncBackend<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn stat_batches(&self) -> usize {
        self.group.world_size()
    }

    fn conv2d_forward(&self, spec: &ConvSpec, n: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        self.inner.conv2d_forward(spec, n, x, w, y)
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

    /// The two passes of the CPU backend's statistics, each one's sums added over the ranks.
    fn channel_stats(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        mean: &mut [f32],
        var: &mut [f32],
    ) {
        let m = (n * hw * self.group.world_size()) as f64;
        let mut s = channel_sums(n, c, hw, x, |_, v| v);
        self.sum(&mut s);
        let mu: Vec<f32> = s.iter().map(|s| (s / m) as f32).collect();
        let mut q = channel_sums(n, c, hw, x, |ch, v| (v - mu[ch]) * (v - mu[ch]));
        self.sum(&mut q);
        mean[..c].copy_from_slice(&mu);
        var[..c]
            .iter_mut()
            .zip(&q)
            .for_each(|(v, q)| *v = (q / m) as f32);
    }

    fn channel_affine(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gamma: &[f32],
        beta: &[f32],
        y: &mut [f32],
        xhat: Option<&mut [f32]>,
    ) {
        self.inner
            .channel_affine(n, c, hw, x, mean, rstd, gamma, beta, y, xhat)
    }

    /// dγ and dβ are this rank's sums (the gradients are summed over the ranks afterwards); dx
    /// takes the means of dy and dy·x̂ over every rank's rows.
    fn batch_norm_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        xhat: &[f32],
        rstd: &[f32],
        gamma: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let mut sums = batch_norm_grad_sums(n, c, hw, xhat, dy);
        for ch in 0..c {
            dbeta[ch] += sums[2 * ch] as f32;
            dgamma[ch] += sums[2 * ch + 1] as f32;
        }
        self.sum(&mut sums);
        let m = (n * hw * self.group.world_size()) as f64;
        batch_norm_input_grad(n, c, hw, &sums, m, (xhat, rstd, gamma, dy), dx);
    }
}
