//! Safe wrappers over each kernel and GEMM of the fused loss, one method per operation. Each
//! method checks shapes and contexts, then enqueues work on the stream without waiting for it.
//!
//! Layout: every matrix is row-major, Z is N×D and C is D×D, exactly as in [`crate::cpu`], whose
//! functions are the CPU twins of these methods.

use super::blas::{Blas, Operand};
use super::module::{kernels, Kernels};
use super::{alloc, check_available, check_context, check_i32, drv, Element, HatElement};
use crate::cpu::STATS_PER_COLUMN;
use crate::error::{Error, Result};
use crate::shape::{check_input, check_output, Dims};
use crate::{LossValue, Math};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Threads per block of the reduction kernels (matches `REDUCE_THREADS` in `loss_reduce.cu`).
const REDUCE_THREADS: u32 = 256;
/// Upper bound on stage-1 blocks; the grid depends only on D, which keeps the sums deterministic.
const MAX_REDUCE_BLOCKS: usize = 65536;
/// Elements (or float4s) per thread that make a stage-1 block worth launching.
const REDUCE_ITEMS_PER_THREAD: usize = 16;
/// Standardization tile (matches `COLS`, `ROWS` in `common.cuh`).
const STD_COLS: u32 = 32;
const STD_ROWS: u32 = 8;

/// The kernels and a cuBLAS handle bound to one stream, plus the small scratch the reduction needs.
pub struct CudaOps {
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    blas: Blas,
    partials: CudaSlice<f32>,
    out: CudaSlice<f64>,
}

impl CudaOps {
    /// Loads the kernels for the stream's context (once per context) and creates a cuBLAS handle.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        check_available()?;
        let kernels = kernels(stream.context())?;
        let blas = Blas::new(stream)?;
        Ok(Self {
            stream: stream.clone(),
            kernels,
            blas,
            partials: alloc(
                stream,
                2 * MAX_REDUCE_BLOCKS,
                "allocating reduction scratch",
            )?,
            out: alloc(stream, 3, "allocating reduction scratch")?,
        })
    }

    /// Queues later work on `stream`, which must belong to the same context. Work already queued
    /// stays where it was; this object's scratch is reused, so call it between, not during, uses.
    pub fn set_stream(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if stream.context().cu_ctx() != self.stream.context().cu_ctx() {
            return Err(Error::WrongContext { name: "stream" });
        }
        self.blas.bind(stream)?;
        self.stream = stream.clone();
        Ok(())
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn kernel(&self, name: &'static str) -> Result<&cudarc::driver::CudaFunction> {
        self.kernels.get(name)
    }

    pub(crate) fn blas(&mut self) -> Result<&Blas> {
        let s = self.stream.clone();
        self.blas.bind(&s)?;
        Ok(&self.blas)
    }

    /// Bytes of device memory this object holds (the reduction scratch).
    pub fn scratch_bytes() -> usize {
        2 * MAX_REDUCE_BLOCKS * 4 + 3 * 8
    }

    /// Per column of `z`: the mean and `rstd = 1/sqrt(var + eps)` (biased variance) into `stats`
    /// (3·D floats, laid out as [`crate::cpu::STATS_PER_COLUMN`] says), and
    /// `zhat = (z − mean)·rstd`, in one kernel (Welford, stable when |mean| ≫ std). Ẑ is f32
    /// for [`Math::F32`], f32 rounded to TF32 for [`Math::Tf32`], bf16 for [`Math::Bf16`]: what
    /// the GEMMs of that mode read.
    pub fn standardize_forward<T: Element, O: HatElement>(
        &self,
        math: Math,
        z: &impl DevicePtr<T>,
        dims: Dims,
        eps: f32,
        zhat: &mut impl DevicePtrMut<O>,
        stats: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (n, d) = dims.checked()?;
        check_input("z", z.len(), dims)?;
        check_output("zhat", zhat.len(), n * d)?;
        check_output("stats", stats.len(), STATS_PER_COLUMN * d)?;
        check_eps(eps)?;
        check_math::<O>(math)?;
        let s = &self.stream;
        check_context("z", z, s)?;
        check_context("zhat", zhat, s)?;
        check_context("stats", stats, s)?;
        let name = match (T::SUFFIX, O::SUFFIX) {
            ("f32", "f32") => "standardize_fwd_f32_f32",
            ("bf16", "f32") => "standardize_fwd_bf16_f32",
            ("f16", "f32") => "standardize_fwd_f16_f32",
            ("f32", "bf16") => "standardize_fwd_f32_bf16",
            ("bf16", "bf16") => "standardize_fwd_bf16_bf16",
            _ => "standardize_fwd_f16_bf16",
        };
        let f = self.kernels.get(name)?;
        let (pz, _gz) = z.device_ptr(s);
        let (ph, _gh) = zhat.device_ptr_mut(s);
        let (pst, _gst) = stats.device_ptr_mut(s);
        let (n64, d64) = (n as i64, d as i64);
        let tf32 = i32::from(math == Math::Tf32);
        let cfg = std_launch(d)?;
        let mut b = s.launch_builder(f);
        b.arg(&pz)
            .arg(&ph)
            .arg(&pst)
            .arg(&n64)
            .arg(&d64)
            .arg(&eps)
            .arg(&tf32);
        // SAFETY: the argument list matches the kernel's signature (const In*, Out*, float*,
        // int64, int64, float, int); every buffer was checked to hold N×D (or 3·D) elements of the
        // right type in this stream's context, and the kernel only touches rows < n, cols < d.
        unsafe { b.launch(cfg) }.map_err(drv(format!("launching {name}")))?;
        Ok(())
    }

    /// Backward through the standardization:
    /// `dz = rstd ⊙ (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))` with x̂ recomputed from `z` and the
    /// `stats` that [`CudaOps::standardize_forward`] wrote.
    pub fn standardize_backward<T: Element>(
        &self,
        g: &impl DevicePtr<f32>,
        z: &impl DevicePtr<T>,
        stats: &impl DevicePtr<f32>,
        dims: Dims,
        dz: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let (n, d) = dims.checked()?;
        check_output("g", g.len(), n * d)?;
        check_input("z", z.len(), dims)?;
        check_output("stats", stats.len(), STATS_PER_COLUMN * d)?;
        check_output("dz", dz.len(), n * d)?;
        let s = &self.stream;
        check_context("g", g, s)?;
        check_context("z", z, s)?;
        check_context("stats", stats, s)?;
        check_context("dz", dz, s)?;
        let name = match T::SUFFIX {
            "f32" => "standardize_bwd_f32",
            "bf16" => "standardize_bwd_bf16",
            _ => "standardize_bwd_f16",
        };
        let f = self.kernels.get(name)?;
        let (pg, _gg) = g.device_ptr(s);
        let (pz, _gz) = z.device_ptr(s);
        let (pst, _gst) = stats.device_ptr(s);
        let (pd, _gd) = dz.device_ptr_mut(s);
        let (n64, d64) = (n as i64, d as i64);
        let cfg = std_launch(d)?;
        let mut b = s.launch_builder(f);
        b.arg(&pg).arg(&pz).arg(&pst).arg(&pd).arg(&n64).arg(&d64);
        // SAFETY: arguments match (const float*, const T*, const float*, T*, int64, int64);
        // sizes and contexts were checked above.
        unsafe { b.launch(cfg) }.map_err(drv(format!("launching {name}")))?;
        Ok(())
    }

    /// `C = Ẑaᵀ·Ẑb / N` through cuBLAS; Ẑ is f32 under [`Math::F32`] and [`Math::Tf32`], bf16
    /// under [`Math::Bf16`]. C is f32 in every mode.
    pub fn cross_correlation<O: HatElement>(
        &mut self,
        math: Math,
        za_hat: &impl DevicePtr<O>,
        zb_hat: &impl DevicePtr<O>,
        dims: Dims,
        c: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (n, d) = dims.checked()?;
        check_math::<O>(math)?;
        check_input("za_hat", za_hat.len(), dims)?;
        check_input("zb_hat", zb_hat.len(), dims)?;
        check_output("c", c.len(), d * d)?;
        let s = self.stream.clone();
        check_context("za_hat", za_hat, &s)?;
        check_context("zb_hat", zb_hat, &s)?;
        check_context("c", c, &s)?;
        self.blas.bind(&s)?;
        let (pa, _ga) = za_hat.device_ptr(&s);
        let (pb, _gb) = zb_hat.device_ptr(&s);
        let (pc, _gc) = c.device_ptr_mut(&s);
        // Row-major C is column-major Cᵀ = Ẑbᵀ·Ẑa; a row-major N×D buffer is column-major D×N.
        // SAFETY: the buffers hold N×D (Ẑ) and D×D (C) elements of the types `math` implies
        // (checked above), in this context; C cannot alias Ẑ since it is borrowed mutably.
        unsafe {
            self.blas.gemm(
                math,
                d,
                d,
                n,
                1.0 / n as f32,
                Operand {
                    ptr: pb,
                    ld: d,
                    trans: false,
                },
                Operand {
                    ptr: pa,
                    ld: d,
                    trans: true,
                },
                pc,
                d,
            )
        }
    }

    /// `dẐa = Ẑb·Gᵀ / N` and `dẐb = Ẑa·G / N` through cuBLAS, with G = dL/dC (f32, or bf16 under
    /// [`Math::Bf16`]); the results are f32.
    #[allow(clippy::too_many_arguments)]
    pub fn correlation_backward<O: HatElement>(
        &mut self,
        math: Math,
        g: &impl DevicePtr<O>,
        za_hat: &impl DevicePtr<O>,
        zb_hat: &impl DevicePtr<O>,
        dims: Dims,
        dza_hat: &mut impl DevicePtrMut<f32>,
        dzb_hat: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (n, d) = dims.checked()?;
        check_math::<O>(math)?;
        check_output("g", g.len(), d * d)?;
        check_input("za_hat", za_hat.len(), dims)?;
        check_input("zb_hat", zb_hat.len(), dims)?;
        check_output("dza_hat", dza_hat.len(), n * d)?;
        check_output("dzb_hat", dzb_hat.len(), n * d)?;
        let s = self.stream.clone();
        check_context("g", g, &s)?;
        check_context("za_hat", za_hat, &s)?;
        check_context("zb_hat", zb_hat, &s)?;
        check_context("dza_hat", dza_hat, &s)?;
        check_context("dzb_hat", dzb_hat, &s)?;
        self.blas.bind(&s)?;
        let (pg, _gg) = g.device_ptr(&s);
        let (pa, _ga) = za_hat.device_ptr(&s);
        let (pb, _gb) = zb_hat.device_ptr(&s);
        let (pda, _gda) = dza_hat.device_ptr_mut(&s);
        let (pdb, _gdb) = dzb_hat.device_ptr_mut(&s);
        let inv_n = 1.0 / n as f32;
        // Column-major: dẐaᵀ = G·Ẑbᵀ (G is the transpose of its buffer's column-major view),
        // dẐbᵀ = Gᵀ·Ẑaᵀ.
        // SAFETY: as in `cross_correlation`; the outputs are distinct mutable borrows, so they
        // alias neither each other nor the inputs.
        unsafe {
            self.blas.gemm(
                math,
                d,
                n,
                d,
                inv_n,
                Operand {
                    ptr: pg,
                    ld: d,
                    trans: true,
                },
                Operand {
                    ptr: pb,
                    ld: d,
                    trans: false,
                },
                pda,
                d,
            )?;
            self.blas.gemm(
                math,
                d,
                n,
                d,
                inv_n,
                Operand {
                    ptr: pg,
                    ld: d,
                    trans: false,
                },
                Operand {
                    ptr: pa,
                    ld: d,
                    trans: false,
                },
                pdb,
                d,
            )
        }
    }

    /// The fused reduction over C, in place: both loss terms, and (when `write_grad`) dL/dC
    /// written over C (rounded to TF32 under [`Math::Tf32`], for the backward GEMMs). Queues the
    /// work; read the value with [`CudaOps::read_loss`].
    pub fn loss_reduce_in_place(
        &mut self,
        math: Math,
        c: &mut impl DevicePtrMut<f32>,
        d: usize,
        lambda: f32,
        write_grad: bool,
    ) -> Result<()> {
        let dd = check_dd(d)?;
        check_output("c", c.len(), dd)?;
        check_context("c", c, &self.stream.clone())?;
        let s = self.stream.clone();
        let (pc, _gc) = c.device_ptr_mut(&s);
        let grad = if write_grad { pc } else { 0 };
        let tf32 = Some(i32::from(math == Math::Tf32));
        self.reduce("loss_reduce_partial_f32", pc, grad, d, lambda, tf32)
    }

    /// The fused reduction over C with dL/dC written as bf16 into `grad` (for the bf16 backward
    /// GEMMs); C is left as it was.
    pub fn loss_reduce_bf16_grad(
        &mut self,
        c: &impl DevicePtr<f32>,
        grad: &mut impl DevicePtrMut<half::bf16>,
        d: usize,
        lambda: f32,
    ) -> Result<()> {
        let dd = check_dd(d)?;
        check_output("c", c.len(), dd)?;
        check_output("grad", grad.len(), dd)?;
        let s = self.stream.clone();
        check_context("c", c, &s)?;
        check_context("grad", grad, &s)?;
        let (pc, _gc) = c.device_ptr(&s);
        let (pg, _gg) = grad.device_ptr_mut(&s);
        self.reduce("loss_reduce_partial_bf16", pc, pg, d, lambda, None)
    }

    /// `tf32` is the f32 kernel's rounding flag; the bf16 kernel takes none.
    fn reduce(
        &mut self,
        name: &'static str,
        c: u64,
        grad: u64,
        d: usize,
        lambda: f32,
        tf32: Option<i32>,
    ) -> Result<()> {
        if !lambda.is_finite() {
            return Err(Error::InvalidConfig(format!(
                "lambda = {lambda} is not finite"
            )));
        }
        let s = self.stream.clone();
        // float4 loads need d % 4 == 0 and 16-byte aligned pointers (a view may start anywhere).
        let vec = d % 4 == 0 && c % 16 == 0 && grad % 16 == 0;
        let vec_flag = i32::from(vec);
        let items = if vec { d * d / 4 } else { d * d };
        let per_block = REDUCE_THREADS as usize * REDUCE_ITEMS_PER_THREAD;
        let blocks = items.div_ceil(per_block).clamp(1, MAX_REDUCE_BLOCKS);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let d64 = d as i64;
        let f = self.kernels.get(name)?;
        {
            let (pp, _gp) = self.partials.device_ptr_mut(&s);
            let mut b = s.launch_builder(f);
            b.arg(&c)
                .arg(&grad)
                .arg(&pp)
                .arg(&d64)
                .arg(&lambda)
                .arg(&vec_flag);
            if let Some(t) = &tf32 {
                b.arg(t);
            }
            // SAFETY: (const float* c, G* grad, float* partials, int64 d, float lambda, int vec
            // [, int tf32 for the f32 kernel]); c holds D×D floats (checked by the caller), grad
            // is null or D×D elements of G, partials holds 2·MAX_REDUCE_BLOCKS ≥ 2·blocks floats,
            // and vec is set only for 16-byte aligned pointers with d % 4 == 0.
            unsafe { b.launch(cfg) }.map_err(drv(format!("launching {name}")))?;
        }
        let fin = self.kernels.get("loss_reduce_final")?;
        let (pp, _gp) = self.partials.device_ptr(&s);
        let (po, _go) = self.out.device_ptr_mut(&s);
        let nblocks = blocks as i64;
        let lambda64 = f64::from(lambda);
        let mut b = s.launch_builder(fin);
        b.arg(&pp).arg(&nblocks).arg(&lambda64).arg(&po);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (const float* partials, int64 blocks, double lambda, double* out); partials holds
        // the 2·blocks values stage 1 wrote, out holds 3 doubles.
        unsafe { b.launch(cfg) }.map_err(drv("launching loss_reduce_final"))?;
        Ok(())
    }

    /// Waits for the stream and returns the loss of the last reduction.
    pub fn read_loss(&self) -> Result<LossValue> {
        let mut host = [0f64; 3];
        self.stream
            .memcpy_dtoh(&self.out, &mut host)
            .map_err(drv("reading the loss back"))?;
        self.stream
            .synchronize()
            .map_err(drv("waiting for the loss kernels"))?;
        self.stream
            .context()
            .check_err()
            .map_err(drv("a queued CUDA operation"))?;
        Ok(LossValue::new(host[0], host[1]))
    }
}

fn std_launch(d: usize) -> Result<LaunchConfig> {
    let blocks = d.div_ceil(STD_COLS as usize);
    let blocks = u32::try_from(blocks).map_err(|_| Error::TooLarge {
        what: format!("D = {d} needs more than 2^32 blocks"),
    })?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (STD_COLS, STD_ROWS, 1),
        shared_mem_bytes: 0,
    })
}

fn check_dd(d: usize) -> Result<usize> {
    if d == 0 {
        return Err(Error::EmptyFeatures);
    }
    check_i32("D", d)?;
    d.checked_mul(d).ok_or_else(|| Error::TooLarge {
        what: format!("D×D with D = {d}"),
    })
}

fn check_eps(eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::InvalidConfig(format!(
            "eps = {eps} must be finite and > 0"
        )));
    }
    Ok(())
}

/// Ẑ's element type must be what the math mode multiplies: bf16 for `Math::Bf16`, else f32.
fn check_math<O: HatElement>(math: Math) -> Result<()> {
    let want = if math == Math::Bf16 { "bf16" } else { "f32" };
    if O::SUFFIX != want {
        return Err(Error::InvalidConfig(format!(
            "math {math:?} multiplies {want} matrices, but Ẑ is {}",
            O::SUFFIX
        )));
    }
    Ok(())
}
