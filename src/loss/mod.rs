//! The public loss: configuration, value, and [`BarlowTwinsLoss`] with its CPU and CUDA entry points.

pub(crate) mod distributed;

use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cuda::{self, fused, Element};
use crate::error::{Error, Result};
use crate::shape::{check_input, check_output, Dims};
#[cfg(feature = "cuda")]
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
#[cfg(feature = "cuda")]
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};

/// Precision of the cross-correlation GEMMs. Accumulation is f32 in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Math {
    /// Plain f32 GEMMs.
    #[default]
    F32,
    /// f32 storage, TF32 tensor-core multiplies (about 1e-3 relative error).
    Tf32,
    /// Ẑ and dL/dC stored in bf16 for the GEMMs, f32 output (about 1e-2 relative error).
    Bf16,
}

/// How the cross-correlation's terms are computed. Both are exact; they differ in cost and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LossPath {
    /// Gram when it is cheaper (4N < 3D) or when C would not fit (D² > 2³⁰ elements), else Direct.
    #[default]
    Auto,
    /// Through C = ẐaᵀẐb / N (D×D): 6·N·D² flops, D² memory.
    Direct,
    /// Through the batch Gram matrices ẐaẐaᵀ, ẐbẐbᵀ (N×N): 8·N²·D flops, N² memory.
    Gram,
}

impl LossPath {
    /// The concrete path for a shape (`Direct` or `Gram`).
    pub fn resolve(self, dims: Dims) -> LossPath {
        match self {
            LossPath::Auto => {
                let (n, d) = (dims.n as f64, dims.d as f64);
                if 4.0 * n < 3.0 * d || d * d > (1u64 << 30) as f64 {
                    LossPath::Gram
                } else {
                    LossPath::Direct
                }
            }
            p => p,
        }
    }
}

/// Loss hyper-parameters: `LossConfig::default()` is the paper's, and setters change one field
/// (`LossConfig::default().math(Math::Tf32)`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LossConfig {
    /// Weight of the off-diagonal (redundancy-reduction) term; the paper uses 0.0051.
    pub lambda: f32,
    /// Added to the batch variance before the square root, as BatchNorm does (1e-5).
    pub eps: f32,
    /// GEMM precision on the GPU. The CPU path always computes in f32.
    pub math: Math,
    /// Direct (D×D) or Gram (N×N) computation, or chosen per shape.
    pub path: LossPath,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            lambda: 0.0051,
            eps: 1e-5,
            math: Math::F32,
            path: LossPath::Auto,
        }
    }
}

setters!(LossConfig {
    lambda: f32,
    eps: f32,
    math: Math,
    path: LossPath,
});

impl LossConfig {
    /// Checks that λ is finite and ≥ 0 and that eps is finite and > 0.
    pub fn validate(&self) -> Result<()> {
        // Above this the off-diagonal gradient 2λ·Cᵢⱼ, scaled through the standardization's
        // 1/√eps, no longer fits an f32 for every input a run can produce.
        const MAX_LAMBDA: f32 = 1e6;
        if !(self.lambda.is_finite() && (0.0..=MAX_LAMBDA).contains(&self.lambda)) {
            return Err(Error::InvalidConfig(format!(
                "lambda = {} must be finite, >= 0 and at most {MAX_LAMBDA:e}",
                self.lambda
            )));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "eps = {} must be finite and > 0",
                self.eps
            )));
        }
        Ok(())
    }
}

/// The loss and its two terms: `total = on_diag + off_diag`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossValue {
    /// The loss.
    pub total: f64,
    /// Invariance term Σᵢ (1 − Cᵢᵢ)².
    pub on_diag: f64,
    /// Redundancy-reduction term λ·Σᵢ≠ⱼ Cᵢⱼ² (already weighted by λ).
    pub off_diag: f64,
    /// The path that computed it (`Direct` or `Gram`).
    pub path: LossPath,
}

impl LossValue {
    /// A value from its two terms, computed by the direct path.
    pub fn new(on_diag: f64, off_diag: f64) -> Self {
        Self {
            total: on_diag + off_diag,
            on_diag,
            off_diag,
            path: LossPath::Direct,
        }
    }

    /// The same value, marked as computed by `path`.
    pub fn via(self, path: LossPath) -> Self {
        Self { path, ..self }
    }
}

/// Host buffers the CPU path reuses between calls.
#[derive(Default)]
struct CpuWorkspace {
    zhat_a: Vec<f32>,
    zhat_b: Vec<f32>,
    stats_a: Vec<f32>,
    stats_b: Vec<f32>,
    c: Vec<f32>,
    ga: Vec<f32>,
    gb: Vec<f32>,
    dhat_a: Vec<f32>,
    dhat_b: Vec<f32>,
    /// The whole batch's Ẑa and Ẑb, gathered from every rank (distributed Gram path only).
    all_a: Vec<f32>,
    all_b: Vec<f32>,
}

impl CpuWorkspace {
    /// Sizes every buffer for (N, D, path). Growth is fallible: a D×D matrix the machine cannot
    /// hold is an [`Error::OutOfHostMemory`], not an abort.
    fn fit(&mut self, n: usize, d: usize, path: LossPath) -> Result<()> {
        self.fit_rows(n, n, d, path)
    }

    /// Sizes every buffer for `n` local rows of a batch of `total` rows (several ranks): the
    /// Gram path holds the local rows of the N×N matrices and, when split, the whole batch.
    fn fit_rows(&mut self, n: usize, total: usize, d: usize, path: LossPath) -> Result<()> {
        fn grow(v: &mut Vec<f32>, len: usize, what: &str) -> Result<()> {
            let bytes = len.saturating_mul(std::mem::size_of::<f32>());
            // With overcommit an allocation can succeed and the process die when it is touched:
            // what the machine cannot give now is refused up front.
            let more = bytes.saturating_sub(v.capacity() * std::mem::size_of::<f32>());
            if crate::io::available_memory().is_some_and(|free| more as u64 > free) {
                return Err(Error::OutOfHostMemory {
                    during: format!("allocating the loss's {what}"),
                    bytes,
                });
            }
            if len > v.len() {
                v.try_reserve_exact(len - v.len())
                    .map_err(|_| Error::OutOfHostMemory {
                        during: format!("allocating the loss's {what}"),
                        bytes: len.saturating_mul(std::mem::size_of::<f32>()),
                    })?;
            }
            v.resize(len, 0.0);
            Ok(())
        }
        for v in [
            &mut self.zhat_a,
            &mut self.zhat_b,
            &mut self.dhat_a,
            &mut self.dhat_b,
        ] {
            grow(v, n * d, "N×D buffers")?;
        }
        for v in [&mut self.stats_a, &mut self.stats_b] {
            grow(v, cpu::STATS_PER_COLUMN * d, "column statistics")?;
        }
        // Only the chosen path's matrices are held.
        let (c, g) = if path == LossPath::Gram {
            (0, n * total)
        } else {
            (d * d, 0)
        };
        let all = if path == LossPath::Gram && total > n {
            total * d
        } else {
            0
        };
        for (v, len, what) in [
            (
                &mut self.c,
                c,
                "D×D matrix C (the Gram path needs only N×N)",
            ),
            (&mut self.ga, g, "N×N Gram matrix"),
            (&mut self.gb, g, "N×N Gram matrix"),
            (&mut self.all_a, all, "gathered batch"),
            (&mut self.all_b, all, "gathered batch"),
        ] {
            grow(v, len, what)?;
            v.shrink_to(len);
        }
        Ok(())
    }
}

/// The Barlow Twins loss with its gradients, on the CPU or a CUDA stream.
///
/// Inputs are the two views' projector outputs Za, Zb, each N×D row-major. Each column is
/// standardized over the batch (biased variance, `eps`), `C = ẐaᵀẐb / N`, and
/// `L = Σᵢ (1 − Cᵢᵢ)² + λ·Σᵢ≠ⱼ Cᵢⱼ²`. The backward pass runs through the standardization.
///
/// The object keeps its working buffers (host and device) between calls; it is `Sync`, and
/// concurrent calls on one object take turns.
///
/// ```
/// use barlow::{BarlowTwinsLoss, Dims, LossConfig};
///
/// let (n, d) = (8, 4);
/// let za: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 11) as f32).sin()).collect();
/// let zb: Vec<f32> = (0..n * d).map(|i| ((i * 53 % 13) as f32).cos()).collect();
/// let loss = BarlowTwinsLoss::new(LossConfig::default())?;
/// let (mut dza, mut dzb) = (vec![0.0; n * d], vec![0.0; n * d]);
/// let v = loss.forward_backward_cpu(&za, &zb, Dims::new(n, d), &mut dza, &mut dzb)?;
/// assert!((v.total - (v.on_diag + v.off_diag)).abs() < 1e-12);
/// # Ok::<(), barlow::Error>(())
/// ```
pub struct BarlowTwinsLoss {
    config: LossConfig,
    cpu: Mutex<CpuWorkspace>,
    #[cfg(feature = "cuda")]
    gpu: Mutex<Option<fused::Workspace>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these buffers in a state that matters: every call rewrites
    // what it reads.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BarlowTwinsLoss {
    /// A loss with the given configuration (validated here).
    pub fn new(config: LossConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            cpu: Mutex::default(),
            #[cfg(feature = "cuda")]
            gpu: Mutex::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LossConfig {
        &self.config
    }

    /// The loss of host inputs (f32, N×D row-major).
    pub fn forward_cpu(&self, za: &[f32], zb: &[f32], dims: Dims) -> Result<LossValue> {
        self.run_cpu(za, zb, dims, None)
    }

    /// The loss of host inputs, with dL/dZa and dL/dZb written into the first N×D elements of
    /// `dza` and `dzb`.
    pub fn forward_backward_cpu(
        &self,
        za: &[f32],
        zb: &[f32],
        dims: Dims,
        dza: &mut [f32],
        dzb: &mut [f32],
    ) -> Result<LossValue> {
        self.run_cpu(za, zb, dims, Some((dza, dzb)))
    }

    fn run_cpu(
        &self,
        za: &[f32],
        zb: &[f32],
        dims: Dims,
        grads: Option<(&mut [f32], &mut [f32])>,
    ) -> Result<LossValue> {
        let (n, d) = dims.checked()?;
        check_input("za", za.len(), dims)?;
        check_input("zb", zb.len(), dims)?;
        if let Some((dza, dzb)) = &grads {
            check_output("dza", dza.len(), n * d)?;
            check_output("dzb", dzb.len(), n * d)?;
        }
        let path = self.config.path.resolve(dims);
        let mut guard = lock(&self.cpu);
        let w = &mut *guard;
        w.fit(n, d, path)?;
        let eps = self.config.eps;
        let lambda = self.config.lambda;
        cpu::standardize_forward(za, dims, eps, &mut w.zhat_a, &mut w.stats_a)?;
        cpu::standardize_forward(zb, dims, eps, &mut w.zhat_b, &mut w.stats_b)?;
        let value = if path == LossPath::Gram {
            let grads = grads
                .is_some()
                .then_some((&mut w.dhat_a[..], &mut w.dhat_b[..]));
            cpu::gram::loss(
                &w.zhat_a, &w.zhat_b, dims, lambda, &mut w.ga, &mut w.gb, grads,
            )?
            .via(LossPath::Gram)
        } else {
            cpu::cross_correlation(&w.zhat_a, &w.zhat_b, dims, &mut w.c)?;
            let v = cpu::loss_reduce(&mut w.c, d, lambda, grads.is_some())?;
            if grads.is_some() {
                cpu::correlation_backward(
                    &w.c,
                    &w.zhat_a,
                    &w.zhat_b,
                    dims,
                    &mut w.dhat_a,
                    &mut w.dhat_b,
                )?;
            }
            v
        };
        if !value.total.is_finite() {
            return Err(Error::NonFinite { total: value.total });
        }
        if let Some((dza, dzb)) = grads {
            cpu::standardize_backward(&w.dhat_a, za, &w.stats_a, dims, dza)?;
            cpu::standardize_backward(&w.dhat_b, zb, &w.stats_b, dims, dzb)?;
        }
        Ok(value)
    }

    /// The loss of device inputs (f32, bf16 or f16; N×D row-major) on `stream`. Waits for the
    /// stream to read the three scalars back; a non-finite loss is [`Error::NonFinite`].
    #[cfg(feature = "cuda")]
    pub fn forward<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
    ) -> Result<LossValue> {
        self.queue::<T, cudarc::driver::CudaSlice<T>, _>(stream, za, zb, dims, None, |ws| ws.read())
    }

    /// The loss of device inputs with dL/dZa and dL/dZb (same element type as the inputs) written
    /// into the first N×D elements of `dza` and `dzb`. All work is queued on `stream`, which is
    /// waited on once, to read the loss; a non-finite loss is [`Error::NonFinite`].
    /// [`BarlowTwinsLoss::forward_backward_on_device`] is the same without the wait.
    #[cfg(feature = "cuda")]
    pub fn forward_backward<T: Element, Dz: DevicePtrMut<T>>(
        &self,
        stream: &Arc<CudaStream>,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
        dza: &mut Dz,
        dzb: &mut Dz,
    ) -> Result<LossValue> {
        self.queue(stream, za, zb, dims, Some((dza, dzb)), |ws| ws.read())
    }

    /// Queues the loss and its gradients on `stream` and returns without waiting: the loss goes
    /// to `out`, device memory the caller owns, which receives the first `min(out.len(), 4)` of
    /// [total, on-diagonal term, off-diagonal term, non-finite flag] as f32 (indices
    /// [`cuda::LOSS_TOTAL`], ..., [`cuda::LOSS_NON_FINITE`]); a one-element `out` is a device
    /// scalar for a framework's loss tensor. Non-finite inputs are not an error here (that would
    /// need the host to look): they set the flag, and the loss and gradients are then NaN.
    ///
    /// Nothing waits on the host and, once the workspace exists for this shape (after one call),
    /// nothing allocates, so the call can be captured in a CUDA graph: make one call first, then
    /// capture on a stream other than the context's default (legacy) stream, with cudarc's event
    /// tracking disabled on the context before the buffers are made (otherwise every access
    /// waits on an event recorded before the capture, which a capture may not do). Each launch of
    /// the graph computes the loss of whatever the input buffers then hold. Calls on one object
    /// are ordered by the streams they are queued on: a later call on another stream must be
    /// ordered after this one by the caller (cudarc's event tracking does it when enabled).
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_on_device<T: Element, Dz: DevicePtrMut<T>>(
        &self,
        stream: &Arc<CudaStream>,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
        dza: &mut Dz,
        dzb: &mut Dz,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        cuda::check_loss_output(out, stream)?;
        self.queue(stream, za, zb, dims, Some((dza, dzb)), |ws| ws.publish(out))
    }

    /// [`BarlowTwinsLoss::forward_backward_on_device`] without the gradients.
    #[cfg(feature = "cuda")]
    pub fn forward_on_device<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        cuda::check_loss_output(out, stream)?;
        self.queue::<T, cudarc::driver::CudaSlice<T>, _>(stream, za, zb, dims, None, |ws| {
            ws.publish(out)
        })
    }

    /// Checks everything, queues the loss (and gradients) on `stream`, then hands the workspace
    /// holding the result to `finish` (which reads it back or copies it on the device).
    #[cfg(feature = "cuda")]
    fn queue<T: Element, Dz: DevicePtrMut<T>, R>(
        &self,
        stream: &Arc<CudaStream>,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
        grads: Option<(&mut Dz, &mut Dz)>,
        finish: impl FnOnce(&fused::Workspace) -> Result<R>,
    ) -> Result<R> {
        cuda::check_available()?;
        fused::check_inputs(stream, za, zb, dims)?;
        if let Some((dza, dzb)) = &grads {
            fused::check_grads(stream, *dza, *dzb, dims)?;
        }
        let path = self.config.path.resolve(dims);
        let mut slot = lock(&self.gpu);
        let ws = fused::Workspace::ensure(&mut slot, stream, dims, self.config.math, path)?;
        fused::run(ws, &self.config, stream, za, zb, dims, grads)?;
        finish(ws)
    }

    /// Device bytes the CUDA path holds for this shape (its workspace; cuBLAS's own comes on top).
    #[cfg(feature = "cuda")]
    pub fn device_workspace_bytes(&self, dims: Dims) -> usize {
        fused::workspace_bytes(dims, self.config.math, self.config.path)
    }
}
