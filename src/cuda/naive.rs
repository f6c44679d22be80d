//! The naive CUDA baseline: the reference PyTorch loss ported op by op (see `kernels/bench/naive.cu`).
//! Every intermediate is a fresh device buffer (freed in stream order when it goes out of scope)
//! and every step its own launch, as eager execution runs it. It exists to be measured against, and tested against the fused path.

use super::blas::Operand;
use super::fatbin::BENCH;
use super::module::{kernels, Kernels};
use super::ops::CudaOps;
use super::{alloc, check_available, drv};
use crate::error::{Error, Result};
use crate::shape::Dims;
use crate::{LossConfig, LossValue, Math};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::sync::Arc;

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

/// Launches `name` over `len` threads with the given arguments (each an lvalue of a device pointer
/// as u64, an i64 or an f32 matching the kernel's signature in `naive.cu`).
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr, $($arg:expr),+) => {
        launch!($self, kernels, $name, $cfg, $($arg),+)
    };
    ($self:expr, $module:ident, $name:literal, $cfg:expr, $($arg:expr),+) => {{
        let s = $self.ops.stream().clone();
        let f = $self.$module.get($name)?;
        let mut b = s.launch_builder(f);
        $( b.arg(&$arg); )+
        // SAFETY: the arguments follow the kernel's signature in naive.cu, and every buffer was
        // allocated here (or checked by `forward_backward`) with the length the kernel indexes.
        unsafe { b.launch($cfg) }.map_err(drv(concat!("launching ", $name)))?;
    }};
}

struct View {
    var: CudaSlice<f32>,
    zhat: CudaSlice<f32>,
}

impl NaiveLoss {
    /// Creates the baseline for `stream`.
    pub fn new(stream: &Arc<CudaStream>, config: LossConfig) -> Result<Self> {
        config.validate()?;
        check_available()?;
        Ok(Self {
            config,
            ops: CudaOps::new(stream)?,
            kernels: kernels(stream.context(), &BENCH)?,
            loss: kernels(stream.context(), &super::fatbin::LOSS)?,
        })
    }

    /// The address of one of this baseline's own buffers, which only its stream ever touches (so
    /// dropping the event guard at once orders nothing wrongly).
    fn ptr<T>(&self, b: &impl DevicePtr<T>) -> u64 {
        let (p, _g) = b.device_ptr(self.ops.stream());
        p
    }

    fn ptr_mut<T>(&self, b: &mut impl DevicePtrMut<T>) -> u64 {
        let (p, _g) = b.device_ptr_mut(self.ops.stream());
        p
    }

    fn buf(&self, len: usize) -> Result<CudaSlice<f32>> {
        alloc(self.ops.stream(), len, "allocating a naive-path buffer")
    }

    fn standardize(&self, z: u64, n: usize, d: usize) -> Result<View> {
        let (n64, d64, eps) = (n as i64, d as i64, self.config.eps);
        let mut mean = self.buf(d)?;
        let mut var = self.buf(d)?;
        let mut zhat = self.buf(n * d)?;
        let (pm, pv, ph) = (
            self.ptr_mut(&mut mean),
            self.ptr_mut(&mut var),
            self.ptr_mut(&mut zhat),
        );
        launch!(self, "naive_col_mean", grid(d), z, pm, n64, d64);
        launch!(self, "naive_col_var", grid(d), z, pm, pv, n64, d64);
        launch!(
            self,
            "naive_normalize",
            grid(n * d),
            z,
            pm,
            pv,
            ph,
            n64,
            d64,
            eps
        );
        Ok(View { var, zhat })
    }

    /// Sum of `len` floats into a fresh device scalar (read back only at the end, as a framework
    /// keeps its loss on the device).
    fn sum(&self, x: u64, len: usize) -> Result<CudaSlice<f32>> {
        let mut partials = self.buf(SUM_BLOCKS)?;
        let mut out = self.buf(1)?;
        let (pp, po) = (self.ptr_mut(&mut partials), self.ptr_mut(&mut out));
        let (len64, blocks64) = (len as i64, SUM_BLOCKS as i64);
        let cfg = LaunchConfig {
            grid_dim: (SUM_BLOCKS as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "naive_sum_partial", cfg, x, pp, len64);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            ..cfg
        };
        launch!(self, "naive_sum_final", one, pp, po, blocks64);
        Ok(out)
    }

    /// `C (row-major) = scale · op(x)·op(y)` in the mode's precision; bf16 casts first, as autocast.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self,
        m: usize,
        n: usize,
        k: usize,
        scale: f32,
        a: Operand,
        b: Operand,
        a_len: usize,
        b_len: usize,
        c: u64,
    ) -> Result<()> {
        let math = self.config.math;
        if math == Math::Bf16 {
            let s = self.ops.stream().clone();
            let mut a16 = alloc::<half::bf16>(&s, a_len, "allocating a naive-path buffer")?;
            let mut b16 = alloc::<half::bf16>(&s, b_len, "allocating a naive-path buffer")?;
            let (pa, pb) = (self.ptr_mut(&mut a16), self.ptr_mut(&mut b16));
            let (al, bl) = (a_len as i64, b_len as i64);
            launch!(self, loss, "naive_cast_bf16", grid(a_len), a.ptr, pa, al);
            launch!(self, loss, "naive_cast_bf16", grid(b_len), b.ptr, pb, bl);
            let blas = self.ops.blas()?;
            // SAFETY: a16/b16 hold a_len/b_len bf16 values cast from operands of those lengths,
            // which the caller sized for these m, n, k and leading dimensions; c is a fresh buffer.
            unsafe {
                blas.gemm(
                    math,
                    m,
                    n,
                    k,
                    scale,
                    Operand { ptr: pa, ..a },
                    Operand { ptr: pb, ..b },
                    0.0,
                    c,
                    m,
                )
            }
        } else {
            let blas = self.ops.blas()?;
            // SAFETY: the caller passes f32 device buffers sized for these m, n, k and leading
            // dimensions, and a distinct output.
            unsafe { blas.gemm(math, m, n, k, scale, a, b, 0.0, c, m) }
        }
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
        let (nd, dd) = (n * d, d * d);
        let (n64, d64, eps) = (n as i64, d as i64, self.config.eps);
        let lambda = self.config.lambda;
        // The caller's buffers may be used on other streams: their guards record the events that
        // order such use, so they live until every launch that touches them has been queued.
        let (pza, _za_done) = za.device_ptr(&stream);
        let (pzb, _zb_done) = zb.device_ptr(&stream);
        let (pdza, _dza_done) = dza.device_ptr_mut(&stream);
        let (pdzb, _dzb_done) = dzb.device_ptr_mut(&stream);

        // Forward: bn(z1), bn(z2), c = bn(z1).T @ bn(z2) / N.
        let a = self.standardize(pza, n, d)?;
        let b = self.standardize(pzb, n, d)?;
        let (pha, phb) = (self.ptr(&a.zhat), self.ptr(&b.zhat));
        let mut c = self.buf(dd)?;
        let pc = self.ptr_mut(&mut c);
        self.gemm(
            d,
            d,
            n,
            1.0 / n as f32,
            Operand {
                ptr: phb,
                ld: d,
                trans: false,
            },
            Operand {
                ptr: pha,
                ld: d,
                trans: true,
            },
            nd,
            nd,
            pc,
        )?;

        // on_diag = diagonal(c).add(-1).pow(2).sum()
        let mut diag = self.buf(d)?;
        let mut shifted = self.buf(d)?;
        let mut on_sq = self.buf(d)?;
        let (pdiag, pshift, ponsq) = (
            self.ptr_mut(&mut diag),
            self.ptr_mut(&mut shifted),
            self.ptr_mut(&mut on_sq),
        );
        let (one, minus_one) = (1f32, -1f32);
        launch!(self, "naive_diag_copy", grid(d), pc, pdiag, d64);
        launch!(
            self,
            "naive_affine",
            grid(d),
            pdiag,
            pshift,
            d64,
            one,
            minus_one
        );
        launch!(self, "naive_square", grid(d), pshift, ponsq, d64);
        let on = self.sum(ponsq, d)?;

        // off_diag = off_diagonal(c).pow(2).sum()
        let off_len = d * (d - 1);
        let off_len64 = off_len as i64;
        let mut off_vals = self.buf(off_len)?;
        let mut off_sq = self.buf(off_len)?;
        let (poff, poffsq) = (self.ptr_mut(&mut off_vals), self.ptr_mut(&mut off_sq));
        launch!(self, "naive_off_diag_copy", grid(off_len), pc, poff, d64);
        launch!(self, "naive_square", grid(off_len), poff, poffsq, off_len64);
        let off = if off_len > 0 {
            Some(self.sum(poffsq, off_len)?)
        } else {
            None
        };

        // Backward: dL/dC assembled from the two terms' gradients.
        let mut gc = stream
            .alloc_zeros::<f32>(dd)
            .map_err(drv("allocating a naive-path buffer"))?;
        let pgc = self.ptr_mut(&mut gc);
        let mut g_off = self.buf(off_len)?;
        let pgoff = self.ptr_mut(&mut g_off);
        let (two_lambda, zero, two, minus_two) = (2.0 * lambda, 0f32, 2f32, -2f32);
        launch!(
            self,
            "naive_affine",
            grid(off_len),
            poff,
            pgoff,
            off_len64,
            two_lambda,
            zero
        );
        launch!(
            self,
            "naive_off_diag_scatter",
            grid(off_len),
            pgoff,
            pgc,
            d64
        );
        let mut g_diag = self.buf(d)?;
        let pgdiag = self.ptr_mut(&mut g_diag);
        launch!(
            self,
            "naive_affine",
            grid(d),
            pdiag,
            pgdiag,
            d64,
            two,
            minus_two
        );
        launch!(self, "naive_diag_scatter", grid(d), pgdiag, pgc, d64);

        let mut gha = self.buf(nd)?;
        let mut ghb = self.buf(nd)?;
        let (pgha, pghb) = (self.ptr_mut(&mut gha), self.ptr_mut(&mut ghb));
        let inv_n = 1.0 / n as f32;
        self.gemm(
            d,
            n,
            d,
            inv_n,
            Operand {
                ptr: pgc,
                ld: d,
                trans: true,
            },
            Operand {
                ptr: phb,
                ld: d,
                trans: false,
            },
            dd,
            nd,
            pgha,
        )?;
        self.gemm(
            d,
            n,
            d,
            inv_n,
            Operand {
                ptr: pgc,
                ld: d,
                trans: false,
            },
            Operand {
                ptr: pha,
                ld: d,
                trans: false,
            },
            dd,
            nd,
            pghb,
        )?;

        for (g, view, dz) in [(pgha, &a, pdza), (pghb, &b, pdzb)] {
            let mut s1 = self.buf(d)?;
            let mut s2 = self.buf(d)?;
            let mut prod = self.buf(nd)?;
            let (ps1, ps2, pprod) = (
                self.ptr_mut(&mut s1),
                self.ptr_mut(&mut s2),
                self.ptr_mut(&mut prod),
            );
            let (pzh, pvar) = (self.ptr(&view.zhat), self.ptr(&view.var));
            let nd64 = nd as i64;
            launch!(self, "naive_col_sum", grid(d), g, ps1, n64, d64);
            launch!(self, "naive_mul", grid(nd), g, pzh, pprod, nd64);
            launch!(self, "naive_col_sum", grid(d), pprod, ps2, n64, d64);
            launch!(
                self,
                "naive_bn_bwd",
                grid(nd),
                g,
                pzh,
                pvar,
                ps1,
                ps2,
                dz,
                n64,
                d64,
                eps
            );
        }
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
