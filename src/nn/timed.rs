//! A backend that times another: wall time and floating-point work per kind of operation, for
//! the CPU step's breakdown in `barlow bench train`. What layers do themselves (ReLU, pooling,
//! residual adds, copies) and the loss are not backend calls; a caller measures them as the rest
//! of the step.

use super::{Backend, ConvSpec};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Milliseconds and floating-point operations of one kind of call, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    /// Wall time, in milliseconds.
    pub ms: f64,
    /// Floating-point operations (a multiply-add counts two).
    pub flops: f64,
    /// Calls.
    pub calls: usize,
}

impl Spent {
    /// Billions of floating-point operations per second (0 when no time was spent).
    pub fn gflops(&self) -> f64 {
        if self.ms > 0.0 {
            self.flops / (self.ms * 1e6)
        } else {
            0.0
        }
    }
}

/// `inner`, with every call timed and its work counted by kind.
pub struct TimedBackend<'a> {
    inner: &'a dyn Backend,
    spent: Mutex<BTreeMap<&'static str, Spent>>,
}

impl<'a> TimedBackend<'a> {
    /// Times `inner`'s calls.
    pub fn new(inner: &'a dyn Backend) -> Self {
        Self {
            inner,
            spent: Mutex::new(BTreeMap::new()),
        }
    }

    /// What each kind of call spent so far.
    pub fn spent(&self) -> BTreeMap<&'static str, Spent> {
        self.spent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn time<R>(&self, kind: &'static str, flops: f64, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        let e = spent.entry(kind).or_default();
        e.ms += ms;
        e.flops += flops;
        e.calls += 1;
        r
    }
}

/// Multiply-adds ×2 of one convolution's forward over `n` images.
fn conv_flops(spec: &ConvSpec, n: usize) -> f64 {
    2.0 * (n * spec.out_c * spec.ho() * spec.wo()) as f64 * (spec.in_c * spec.k * spec.k) as f64
}

impl Backend for TimedBackend<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn stat_batches(&self) -> usize {
        self.inner.stat_batches()
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
        self.time("conv forward", conv_flops(spec, n), || {
            self.inner.conv2d_forward(spec, n, x, w, y, moments)
        })
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
        // The filter gradient always, the input gradient when asked: a forward's work each.
        let flops = conv_flops(spec, n) * if dx.is_some() { 2.0 } else { 1.0 };
        self.time("conv backward", flops, || {
            self.inner.conv2d_backward(spec, n, x, w, dy, dx, dw)
        })
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
        let flops = 2.0 * (n * out) as f64 * (w.len() / out.max(1)) as f64;
        self.time("linear forward", flops, || {
            self.inner.linear_forward(n, x, w, b, y, out)
        })
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
        let one = 2.0 * (n * out) as f64 * (w.len() / out.max(1)) as f64;
        let flops = one * if dx.is_some() { 2.0 } else { 1.0 };
        self.time("linear backward", flops, || {
            self.inner.linear_backward(n, x, w, dy, out, dx, dw, db)
        })
    }

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
        // Three sums per element for the moments (unless the convolution gathered them), then a
        // few operations per plane to combine them.
        let per_plane = if moments.is_some() { 0 } else { 5 * hw };
        let flops = ((per_plane + 8) * n * c) as f64;
        self.time("batch norm statistics", flops, || {
            self.inner.channel_stats(n, c, hw, x, moments, mean, var)
        })
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
        // Subtract, scale, shift, then the shortcut's add and the clamp when fused.
        let per = 4.0 + f64::from(u8::from(residual.is_some())) + f64::from(u8::from(relu));
        self.time("batch norm apply", per * (n * c * hw) as f64, || {
            self.inner
                .norm_apply(n, c, hw, x, stats, affine, residual, relu, y)
        })
    }

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
        // Two sums per element (one centred), then five operations for dx.
        let flops = 9.0 * (n * c * hw) as f64;
        self.time("batch norm backward", flops, || {
            self.inner
                .batch_norm_backward(n, c, hw, x, stats, gamma, relu_out, dy, dx, dgamma, dbeta)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::CpuBackend;

    #[test]
    fn calls_are_passed_through_counted_and_timed() {
        let spec = ConvSpec {
            in_c: 3,
            out_c: 5,
            k: 3,
            stride: 1,
            pad: 1,
            h: 6,
            w: 7,
        };
        let n = 2;
        let x: Vec<f32> = (0..n * 3 * 6 * 7).map(|i| (i % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..5 * 3 * 9).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let mut want = vec![f32::NAN; n * 5 * 6 * 7];
        CpuBackend.conv2d_forward(&spec, n, &x, &w, &mut want, None);
        let timed = TimedBackend::new(&CpuBackend);
        let mut got = vec![f32::NAN; want.len()];
        timed.conv2d_forward(&spec, n, &x, &w, &mut got, None);
        timed.conv2d_forward(&spec, n, &x, &w, &mut got, None);
        assert_eq!(got, want);
        let s = timed.spent()["conv forward"];
        assert_eq!(s.calls, 2);
        // 2 images × 5 maps × 6×7 positions × 27 multiply-adds, twice.
        assert_eq!(s.flops, 2.0 * 2.0 * (2 * 5 * 6 * 7 * 27) as f64);
        assert!(s.ms >= 0.0 && s.ms.is_finite());
        assert!(!timed.spent().contains_key("conv backward"));
    }
}
