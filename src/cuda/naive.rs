//! The naive CUDA baseline: the reference PyTorch loss ported op by op (see `kernels/bench/naive.cu`).
//! Every intermediate is a fresh device buffer (freed in stream order when it goes out of scope)
//! and every step its own launch, as eager execution runs it. It exists to be measured against, and tested against the fused path.

use super::blas::Operand;
use super::fatbin::BENCH;
use super::module::{kernels, Kernels};
use super::ops::{kernel as loss_kernel, CudaOps};
use super::{alloc, check_available, drv};
use crate::error::{Error, Result};
use crate::shape::Dims;
use crate::{LossConfig, LossValue, Math};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use std::sync::Arc;

/// The baseline's kernels, as `naive.cu` declares them.
mod kernel {
    use super::super::launch::kernels;
    use super::BENCH;

    kernels! {
        module: BENCH;
        /// Column means.
        fn naive_col_mean(z: &f32, mean: &mut f32, n: i64, d: i64) = "naive_col_mean";
        /// Biased column variances about `mean`.
        fn naive_col_var(z: &f32, mean: &f32, var: &mut f32, n: i64, d: i64) = "naive_col_var";
        /// `(z − mean) / sqrt(var + eps)`.
        fn naive_normalize(
            z: &f32, mean: &f32, var: &f32, zhat: &mut f32, n: i64, d: i64, eps: f32,
        ) = "naive_normalize";
        /// Column sums.
        fn naive_col_sum(x: &f32, out: &mut f32, n: i64, d: i64) = "naive_col_sum";
        /// Elementwise product.
        fn naive_mul(a: &f32, b: &f32, out: &mut f32, len: i64) = "naive_mul";
        /// `a·x + b`.
        fn naive_affine(x: &f32, out: &mut f32, len: i64, a: f32, b: f32) = "naive_affine";
        /// `x²`.
        fn naive_square(x: &f32, out: &mut f32, len: i64) = "naive_square";
        /// C's diagonal.
        fn naive_diag_copy(c: &f32, diag: &mut f32, d: i64) = "naive_diag_copy";
        /// C's off-diagonal elements, row by row.
        fn naive_off_diag_copy(c: &f32, off: &mut f32, d: i64) = "naive_off_diag_copy";
        /// Back into the off-diagonal positions.
        fn naive_off_diag_scatter(off: &f32, gc: &mut f32, d: i64) = "naive_off_diag_scatter";
        /// Back onto the diagonal.
        fn naive_diag_scatter(diag: &f32, gc: &mut f32, d: i64) = "naive_diag_scatter";
        /// Per-block partial sums.
        fn naive_sum_partial(x: &f32, partials: &mut f32, len: i64) = "naive_sum_partial";
        /// The partial sums' total, one block.
        fn naive_sum_final(partials: &f32, out: &mut f32, blocks: i64) = "naive_sum_final";
        /// BatchNorm1d's backward from the two column sums.
        fn naive_bn_bwd(
            g: &f32, zhat: &f32, var: &f32, s1: &f32, s2: &f32, dz: &mut f32, n: i64, d: i64,
            eps: f32,
        ) = "naive_bn_bwd";
    }
}

const THREADS: u32 = 256;
const SUM_BLOCKS: usize = 1024;

/// The baseline loss; f32 inputs, any [`Math`] for its GEMMs.
pub struct NaiveLoss {
    config: LossConfig,
    ops: CudaOps,
    kernels: Arc<Kernels>,
    /// The loss module, for the f32 → bf16 cast the Gram path shares.
    loss: Arc<Kernels>,
}

fn grid(len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (len.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches a baseline kernel: `launch!(self, kernel, cfg, args…)`.
macro_rules! launch {
    ($self:expr, $f:ident, $cfg:expr, $($arg:expr),+ $(,)?) => {
        // SAFETY: every buffer here is allocated by this baseline with the length its kernel's
        // grid covers (the comment at each call says which), or is the caller's N×D input or
        // gradient, checked by `forward_backward`.
        unsafe { kernel::$f(&$self.kernels, $self.ops.stream(), $cfg, $($arg),+) }?
    };
}

/// An f32 GEMM operand: a buffer, its leading dimension and whether it is transposed.
struct Arg<'a> {
    buf: &'a CudaSlice<f32>,
    ld: usize,
    trans: bool,
}

struct View {
    var: CudaSlice<f32>,
    zhat: CudaSlice<f32>,
}

impl NaiveLoss {
    /// Creates the baseline for `stream`.
    pub fn new(stream: &Arc<cudarc::driver::CudaStream>, config: LossConfig) -> Result<Self> {
        config.validate()?;
        check_available()?;
        Ok(Self {
            config,
            ops: CudaOps::new(stream)?,
            kernels: kernels(stream.context(), &BENCH)?,
            loss: kernels(stream.context(), &super::fatbin::LOSS)?,
        })
    }

    fn buf(&self, len: usize) -> Result<CudaSlice<f32>> {
        alloc(self.ops.stream(), len, "allocating a naive-path buffer")
    }

    /// BatchNorm1d without affine, in three kernels: mean, variance, normalize (z is N×D).
    fn standardize(&self, z: &impl DevicePtr<f32>, n: usize, d: usize) -> Result<View> {
        let (n64, d64, eps) = (n as i64, d as i64, self.config.eps);
        let mut mean = self.buf(d)?;
        let mut var = self.buf(d)?;
        let mut zhat = self.buf(n * d)?;
        // D columns; Ẑ N×D.
        launch!(self, naive_col_mean, grid(d), z, &mut mean, n64, d64);
        launch!(self, naive_col_var, grid(d), z, &mean, &mut var, n64, d64);
        #[rustfmt::skip]
        launch!(self, naive_normalize, grid(n * d), z, &mean, &var, &mut zhat, n64, d64, eps);
        Ok(View { var, zhat })
    }

    /// Sum of `len` floats into a fresh device scalar (read back only at the end, as a framework
    /// keeps its loss on the device).
    fn sum(&self, x: &CudaSlice<f32>, len: usize) -> Result<CudaSlice<f32>> {
        let mut partials = self.buf(SUM_BLOCKS)?;
        let mut out = self.buf(1)?;
        let (len64, blocks64) = (len as i64, SUM_BLOCKS as i64);
        let cfg = LaunchConfig {
            grid_dim: (SUM_BLOCKS as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // x holds len floats, the partials SUM_BLOCKS (a grid-stride loop over len).
        launch!(self, naive_sum_partial, cfg, x, &mut partials, len64);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            ..cfg
        };
        launch!(self, naive_sum_final, one, &partials, &mut out, blocks64);
        Ok(out)
    }

    /// `C (row-major) = scale · op(a)·op(b)` into a fresh buffer of `m·n` floats, in the mode's
    /// precision; bf16 casts both operands first, as autocast does.
    fn gemm(
        &mut self,
        (m, n, k): (usize, usize, usize),
        scale: f32,
        a: Arg,
        b: Arg,
    ) -> Result<CudaSlice<f32>> {
        let math = self.config.math;
        let mut c = self.buf(m * n)?;
        let s = self.ops.stream().clone();
        // bf16: both operands cast first, as autocast does; the GEMM then reads the copies.
        let copies = if math == Math::Bf16 {
            let cast = |x: &CudaSlice<f32>| -> Result<CudaSlice<half::bf16>> {
                let mut y = alloc::<half::bf16>(&s, x.len(), "allocating a naive-path buffer")?;
                // SAFETY: the copy holds as many elements as its source.
                unsafe {
                    loss_kernel::naive_cast_bf16(
                        &self.loss,
                        &s,
                        grid(x.len()),
                        x,
                        &mut y,
                        x.len() as i64,
                    )?;
                }
                Ok(y)
            };
            Some((cast(a.buf)?, cast(b.buf)?))
        } else {
            None
        };
        {
            let blas = self.ops.blas()?;
            let ((pa, _ga), (pb, _gb)) = match &copies {
                Some((a16, b16)) => (a16.device_ptr(&s), b16.device_ptr(&s)),
                None => (a.buf.device_ptr(&s), b.buf.device_ptr(&s)),
            };
            let (pc, _gc) = c.device_ptr_mut(&s);
            // SAFETY: the operands (or their bf16 copies) are the buffers the caller sized for
            // these m, n, k and leading dimensions, in the type `math` implies; c holds m·n
            // floats and is a fresh buffer.
            unsafe {
                blas.gemm(
                    math,
                    m,
                    n,
                    k,
                    scale,
                    Operand {
                        ptr: pa,
                        ld: a.ld,
                        trans: a.trans,
                    },
                    Operand {
                        ptr: pb,
                        ld: b.ld,
                        trans: b.trans,
                    },
                    0.0,
                    pc,
                    m,
                )?;
            }
        }
        Ok(c)
    }

    /// BatchNorm1d's backward for one side: dL/dẑ `g` (N×D) into `dz`.
    fn standardize_backward(
        &self,
        g: &CudaSlice<f32>,
        view: &View,
        dz: &mut impl DevicePtrMut<f32>,
        (n, d): (usize, usize),
    ) -> Result<()> {
        let (n64, d64, nd64, eps) = (n as i64, d as i64, (n * d) as i64, self.config.eps);
        let mut s1 = self.buf(d)?;
        let mut s2 = self.buf(d)?;
        let mut prod = self.buf(n * d)?;
        // D column sums; N×D products; dz N×D.
        launch!(self, naive_col_sum, grid(d), g, &mut s1, n64, d64);
        launch!(self, naive_mul, grid(n * d), g, &view.zhat, &mut prod, nd64);
        launch!(self, naive_col_sum, grid(d), &prod, &mut s2, n64, d64);
        #[rustfmt::skip]
        launch!(self, naive_bn_bwd, grid(n * d), g, &view.zhat, &view.var, &s1, &s2, dz, n64, d64, eps);
        Ok(())
    }

    /// Forward and backward, op by op. Inputs are f32, N×D, row-major.
    pub fn forward_backward(
        &mut self,
        za: &impl DevicePtr<f32>,
        zb: &impl DevicePtr<f32>,
        dims: Dims,
        dza: &mut impl DevicePtrMut<f32>,
        dzb: &mut impl DevicePtrMut<f32>,
    ) -> Result<LossValue> {
        let stream = self.ops.stream().clone();
        super::fused::check_inputs(&stream, za, zb, dims)?;
        super::fused::check_grads(&stream, dza, dzb, dims)?;
        let (n, d) = (dims.n, dims.d);
        let dd = d * d;
        let d64 = d as i64;
        let lambda = self.config.lambda;

        // Forward: bn(z1), bn(z2), c = bn(z1).T @ bn(z2) / N.
        let a = self.standardize(za, n, d)?;
        let b = self.standardize(zb, n, d)?;
        // Row-major C is column-major Cᵀ = Ẑbᵀ·Ẑa.
        let c = self.gemm(
            (d, d, n),
            1.0 / n as f32,
            Arg {
                buf: &b.zhat,
                ld: d,
                trans: false,
            },
            Arg {
                buf: &a.zhat,
                ld: d,
                trans: true,
            },
        )?;

        // on_diag = diagonal(c).add(-1).pow(2).sum()   (D floats each)
        let mut diag = self.buf(d)?;
        let mut shifted = self.buf(d)?;
        let mut on_sq = self.buf(d)?;
        launch!(self, naive_diag_copy, grid(d), &c, &mut diag, d64);
        launch!(
            self,
            naive_affine,
            grid(d),
            &diag,
            &mut shifted,
            d64,
            1.0f32,
            -1.0f32
        );
        launch!(self, naive_square, grid(d), &shifted, &mut on_sq, d64);
        let on = self.sum(&on_sq, d)?;

        // off_diag = off_diagonal(c).pow(2).sum()   (D·(D−1) floats each)
        let off_len = d * (d - 1);
        let off_len64 = off_len as i64;
        let mut off_vals = self.buf(off_len)?;
        let mut off_sq = self.buf(off_len)?;
        launch!(
            self,
            naive_off_diag_copy,
            grid(off_len),
            &c,
            &mut off_vals,
            d64
        );
        launch!(
            self,
            naive_square,
            grid(off_len),
            &off_vals,
            &mut off_sq,
            off_len64
        );
        let off = if off_len > 0 {
            Some(self.sum(&off_sq, off_len)?)
        } else {
            None
        };

        // Backward: dL/dC (D×D) assembled from the two terms' gradients.
        let mut gc = stream
            .alloc_zeros::<f32>(dd)
            .map_err(drv("allocating a naive-path buffer"))?;
        let mut g_off = self.buf(off_len)?;
        #[rustfmt::skip]
        launch!(self, naive_affine, grid(off_len), &off_vals, &mut g_off, off_len64, 2.0 * lambda, 0.0f32);
        launch!(
            self,
            naive_off_diag_scatter,
            grid(off_len),
            &g_off,
            &mut gc,
            d64
        );
        let mut g_diag = self.buf(d)?;
        launch!(
            self,
            naive_affine,
            grid(d),
            &diag,
            &mut g_diag,
            d64,
            2.0f32,
            -2.0f32
        );
        launch!(self, naive_diag_scatter, grid(d), &g_diag, &mut gc, d64);

        let inv_n = 1.0 / n as f32;
        let gha = self.gemm(
            (d, n, d),
            inv_n,
            Arg {
                buf: &gc,
                ld: d,
                trans: true,
            },
            Arg {
                buf: &b.zhat,
                ld: d,
                trans: false,
            },
        )?;
        let ghb = self.gemm(
            (d, n, d),
            inv_n,
            Arg {
                buf: &gc,
                ld: d,
                trans: false,
            },
            Arg {
                buf: &a.zhat,
                ld: d,
                trans: false,
            },
        )?;
        self.standardize_backward(&gha, &a, dza, (n, d))?;
        self.standardize_backward(&ghb, &b, dzb, (n, d))?;
        let read = |x: &CudaSlice<f32>| -> Result<f64> {
            let v = stream
                .clone_dtoh(x)
                .map_err(drv("reading a naive-path sum"))?;
            Ok(f64::from(v[0]))
        };
        let on = read(&on)?;
        let off_sum = match &off {
            Some(o) => read(o)?,
            None => 0.0,
        };
        let value = LossValue::new(on, f64::from(lambda) * off_sum);
        if !value.total.is_finite() {
            return Err(Error::NonFinite { total: value.total });
        }
        Ok(value)
    }
}
