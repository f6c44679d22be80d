//! Safe wrappers over each kernel and GEMM of the fused loss, one method per operation. Each
//! method checks shapes and contexts, then enqueues work on the stream without waiting for it.
//!
//! Layout: every matrix is row-major, Z is N×D and C is D×D, exactly as in [`crate::cpu`], whose
//! functions are the CPU twins of these methods.

use super::blas::{Blas, Operand};
use super::fatbin::LOSS;
use super::module::{kernels, Kernels};
use super::{
    alloc, check_available, check_context, check_i32, drv, Dtype, Element, HatDtype, HatElement,
};
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
    /// Gram path scratch, allocated on first use: f64 partial sums, Cᵢᵢ (f64) and kᵢ (f32).
    gram: Option<GramScratch>,
}

struct GramScratch {
    partials: CudaSlice<f64>,
    cii: CudaSlice<f64>,
    coef: CudaSlice<f32>,
}

impl CudaOps {
    /// Loads the kernels for the stream's context (once per context) and creates a cuBLAS handle.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        check_available()?;
        let kernels = kernels(stream.context(), &LOSS)?;
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
            gram: None,
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

    #[cfg(any(feature = "train", feature = "bench"))]
    pub(crate) fn blas(&mut self) -> Result<&Blas> {
        let s = self.stream.clone();
        self.blas.bind(&s)?;
        Ok(&self.blas)
    }

    /// Bytes of the Gram path's f64 partial sums, allocated on its first use.
    pub fn gram_partials_bytes() -> usize {
        MAX_REDUCE_BLOCKS * 8
    }

    /// Bytes of device memory this object holds for the direct path (the reduction scratch).
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
        let name = match (T::DTYPE, O::HAT) {
            (Dtype::F32, HatDtype::F32) => "standardize_fwd_f32_f32",
            (Dtype::Bf16, HatDtype::F32) => "standardize_fwd_bf16_f32",
            (Dtype::F16, HatDtype::F32) => "standardize_fwd_f16_f32",
            (Dtype::F32, HatDtype::Bf16) => "standardize_fwd_f32_bf16",
            (Dtype::Bf16, HatDtype::Bf16) => "standardize_fwd_bf16_bf16",
            (Dtype::F16, HatDtype::Bf16) => "standardize_fwd_f16_bf16",
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
        let name = match T::DTYPE {
            Dtype::F32 => "standardize_bwd_f32",
            Dtype::Bf16 => "standardize_bwd_bf16",
            Dtype::F16 => "standardize_bwd_f16",
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
                0.0,
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
                0.0,
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
                0.0,
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

    /// `g = ẑ·ẑᵀ` (N×N, f32) through cuBLAS, for the Gram path.
    pub fn gram<O: HatElement>(
        &mut self,
        math: Math,
        z_hat: &impl DevicePtr<O>,
        dims: Dims,
        g: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (n, d) = dims.checked()?;
        check_math::<O>(math)?;
        check_input("z_hat", z_hat.len(), dims)?;
        check_output("g", g.len(), n * n)?;
        let s = self.stream.clone();
        check_context("z_hat", z_hat, &s)?;
        check_context("g", g, &s)?;
        self.blas.bind(&s)?;
        let (pz, _gz) = z_hat.device_ptr(&s);
        let (pg, _gg) = g.device_ptr_mut(&s);
        // Column-major, ẑ's buffer is ẑᵀ (D×N): G = (ẑᵀ)ᵀ·ẑᵀ, symmetric.
        // SAFETY: z holds N×D elements of the type `math` implies and g N×N floats, both in this
        // context; g is a distinct mutable borrow.
        unsafe {
            self.blas.gemm(
                math,
                n,
                n,
                d,
                1.0,
                Operand {
                    ptr: pz,
                    ld: d,
                    trans: true,
                },
                Operand {
                    ptr: pz,
                    ld: d,
                    trans: false,
                },
                0.0,
                pg,
                n,
            )
        }
    }

    fn gram_scratch(&mut self, d: usize) -> Result<()> {
        let fits = self.gram.as_ref().is_some_and(|g| g.cii.len() >= d);
        if !fits {
            let s = self.stream.clone();
            let what = "allocating Gram-path scratch";
            self.gram = Some(GramScratch {
                partials: alloc(&s, MAX_REDUCE_BLOCKS, what)?,
                cii: alloc(&s, d, what)?,
                coef: alloc(&s, d, what)?,
            });
        }
        Ok(())
    }

    /// The Gram path's reductions from Ẑa, Ẑb and their Gram matrices `ga`, `gb` (N×N, f32):
    /// both loss terms (read them with [`CudaOps::read_loss`]) and, with `grads`, dL/dẐa and
    /// dL/dẐb (f32). Under [`Math::Bf16`] the gradient GEMMs read `g16` = (Ga, Gb) in bf16;
    /// under [`Math::Tf32`] with gradients, `ga` and `gb` are left rounded to TF32.
    #[allow(clippy::too_many_arguments)]
    pub fn gram_loss<O: HatElement>(
        &mut self,
        math: Math,
        za_hat: &impl DevicePtr<O>,
        zb_hat: &impl DevicePtr<O>,
        ga: &mut impl DevicePtrMut<f32>,
        gb: &mut impl DevicePtrMut<f32>,
        dims: Dims,
        lambda: f32,
        grads: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
        g16: Option<(&mut CudaSlice<half::bf16>, &mut CudaSlice<half::bf16>)>,
    ) -> Result<()> {
        let (n, d) = dims.checked()?;
        check_math::<O>(math)?;
        check_input("za_hat", za_hat.len(), dims)?;
        check_input("zb_hat", zb_hat.len(), dims)?;
        check_output("ga", ga.len(), n * n)?;
        check_output("gb", gb.len(), n * n)?;
        if !lambda.is_finite() {
            return Err(Error::InvalidConfig(format!(
                "lambda = {lambda} is not finite"
            )));
        }
        let s = self.stream.clone();
        for (name, ok) in [
            (
                "za_hat",
                za_hat.stream().context().cu_ctx() == s.context().cu_ctx(),
            ),
            (
                "zb_hat",
                zb_hat.stream().context().cu_ctx() == s.context().cu_ctx(),
            ),
            ("ga", ga.stream().context().cu_ctx() == s.context().cu_ctx()),
            ("gb", gb.stream().context().cu_ctx() == s.context().cu_ctx()),
        ] {
            if !ok {
                return Err(Error::WrongContext { name });
            }
        }
        self.gram_scratch(d)?;
        self.blas.bind(&s)?;
        let (n64, d64, nn64) = (n as i64, d as i64, (n * n) as i64);
        let (pa, _ga_) = za_hat.device_ptr(&s);
        let (pb, _gb_) = zb_hat.device_ptr(&s);
        // Mutable: in TF32 mode the reduction rounds them in place for the gradient GEMMs.
        let (pga, _gga) = ga.device_ptr_mut(&s);
        let (pgb, _ggb) = gb.device_ptr_mut(&s);
        let bf16 = O::HAT == HatDtype::Bf16;
        let kernels = self.kernels.clone();
        let scratch = self.gram.as_mut().ok_or_else(|| Error::Cuda {
            during: "the Gram path".into(),
            message: "scratch missing after allocation".into(),
        })?;
        let (pcii, _gcii) = scratch.cii.device_ptr_mut(&s);
        let (pcoef, _gcoef) = scratch.coef.device_ptr_mut(&s);
        let (pparts, _gparts) = scratch.partials.device_ptr_mut(&s);
        let (pout, _gout) = self.out.device_ptr_mut(&s);

        // Cᵢᵢ, column by column.
        let diag = kernels.get(if bf16 {
            "gram_diag_bf16"
        } else {
            "gram_diag_f32"
        })?;
        let mut b = s.launch_builder(diag);
        b.arg(&pa).arg(&pb).arg(&pcii).arg(&n64).arg(&d64);
        // SAFETY: (const T* a, const T* b, double* cii, int64 n, int64 d): a, b hold N×D elements
        // of T, cii holds at least D doubles (gram_scratch).
        unsafe { b.launch(std_launch(d)?) }.map_err(drv("launching gram_diag"))?;

        // ⟨Ga, Gb⟩ in f64 partials, then the final one-block reduction.
        let per_block = REDUCE_THREADS as usize * REDUCE_ITEMS_PER_THREAD;
        let blocks = (n * n).div_ceil(per_block).clamp(1, MAX_REDUCE_BLOCKS);
        let dot = kernels.get("gram_dot_partial")?;
        let tf32 = i32::from(math == Math::Tf32 && grads.is_some());
        let mut b = s.launch_builder(dot);
        b.arg(&pga).arg(&pgb).arg(&pparts).arg(&nn64).arg(&tf32);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (float* ga, float* gb, double* partials, int64 len, int tf32): ga, gb hold N²
        // floats, partials MAX_REDUCE_BLOCKS ≥ blocks doubles.
        unsafe { b.launch(cfg) }.map_err(drv("launching gram_dot_partial"))?;
        let fin = kernels.get("gram_final")?;
        let (nblocks, lambda64) = (blocks as i64, f64::from(lambda));
        let mut b = s.launch_builder(fin);
        b.arg(&pparts)
            .arg(&nblocks)
            .arg(&pcii)
            .arg(&n64)
            .arg(&d64)
            .arg(&lambda64)
            .arg(&pout)
            .arg(&pcoef);
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            ..cfg
        };
        // SAFETY: (const double* partials, int64 blocks, const double* cii, int64 n, int64 d,
        // double lambda, double* out, float* coef): sizes as above, out holds 3 doubles, coef D.
        unsafe { b.launch(one) }.map_err(drv("launching gram_final"))?;

        let Some((da, db)) = grads else { return Ok(()) };
        check_output("dza_hat", da.len(), n * d)?;
        check_output("dzb_hat", db.len(), n * d)?;
        check_context("dza_hat", &*da, &s)?;
        check_context("dzb_hat", &*db, &s)?;
        let init = kernels.get(if bf16 {
            "gram_grad_init_bf16"
        } else {
            "gram_grad_init_f32"
        })?;
        let scale = (2.0 * f64::from(lambda) / (n as f64 * n as f64)) as f32;
        // The bf16 GEMMs read the Gram matrices in bf16.
        let (pga_g, pgb_g) = match (math, g16) {
            (Math::Bf16, Some((a16, b16))) => {
                check_output("ga16", a16.len(), n * n)?;
                check_output("gb16", b16.len(), n * n)?;
                check_context("ga16", &*a16, &s)?;
                check_context("gb16", &*b16, &s)?;
                let cast = kernels.get("naive_cast_bf16")?;
                let blocks = u32::try_from((n * n).div_ceil(256)).map_err(|_| Error::TooLarge {
                    what: format!("N×N = {} elements for the bf16 Gram copies", n * n),
                })?;
                let cast_cfg = LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (p16a, _g16a) = a16.device_ptr_mut(&s);
                let (p16b, _g16b) = b16.device_ptr_mut(&s);
                for (src, dst) in [(pga, p16a), (pgb, p16b)] {
                    let mut b = s.launch_builder(cast);
                    b.arg(&src).arg(&dst).arg(&nn64);
                    // SAFETY: (const float*, bf16*, int64 len): both hold N² elements.
                    unsafe { b.launch(cast_cfg) }.map_err(drv("launching naive_cast_bf16"))?;
                }
                (p16a, p16b)
            }
            (Math::Bf16, None) => {
                return Err(Error::InvalidConfig(
                    "bf16 Gram gradients need bf16 Gram buffers".into(),
                ))
            }
            _ => (pga, pgb),
        };
        // dẐa = kᵢ·Ẑb + s·Gb·Ẑa ;  dẐb = kᵢ·Ẑa + s·Ga·Ẑb.
        for (out, other, own, g) in [(da, pb, pa, pgb_g), (db, pa, pb, pga_g)] {
            let (po, _go) = out.device_ptr_mut(&s);
            let mut b = s.launch_builder(init);
            b.arg(&other).arg(&pcoef).arg(&po).arg(&n64).arg(&d64);
            let cfg = LaunchConfig {
                grid_dim: ((n * d).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: (const T* other, const float* coef, float* out, int64 n, int64 d): other and
            // out hold N×D elements, coef D floats.
            unsafe { b.launch(cfg) }.map_err(drv("launching gram_grad_init"))?;
            // Column-major: outᵀ (D×N) += s · ownᵀ (D×N) · G (N×N, symmetric).
            // SAFETY: own holds N×D elements, G N×N, out N×D floats, all live in this context.
            unsafe {
                self.blas.gemm(
                    math,
                    d,
                    n,
                    n,
                    scale,
                    Operand {
                        ptr: own,
                        ld: d,
                        trans: false,
                    },
                    Operand {
                        ptr: g,
                        ld: n,
                        trans: false,
                    },
                    1.0,
                    po,
                    d,
                )?;
            }
        }
        Ok(())
    }

    /// Writes the loss of the last reduction into `dst` on the stream, without waiting: the first
    /// `min(len, 4)` of [total, on-diagonal term, off-diagonal term, non-finite flag] (see
    /// [`crate::cuda::DEVICE_LOSS_SLOTS`]), as f32.
    pub fn publish_loss(&self, dst: &mut impl DevicePtrMut<f32>) -> Result<()> {
        let s = &self.stream;
        super::check_loss_output(dst, s)?;
        let slots = dst.len().min(super::DEVICE_LOSS_SLOTS) as i64;
        let f = self.kernels.get("loss_publish")?;
        let (po, _go) = self.out.device_ptr(s);
        let (pd, _gd) = dst.device_ptr_mut(s);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(f);
        b.arg(&po).arg(&pd).arg(&slots);
        // SAFETY: (const double*, float*, int64): `out` holds 3 doubles written by the last
        // reduction on this stream, `dst` at least `slots` floats in this context.
        unsafe { b.launch(cfg) }.map_err(drv("launching loss_publish"))?;
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
    let want = if math == Math::Bf16 {
        HatDtype::Bf16
    } else {
        HatDtype::F32
    };
    if O::HAT != want {
        return Err(Error::InvalidConfig(format!(
            "math {math:?} multiplies {want:?} matrices, but Ẑ is {:?}",
            O::HAT
        )));
    }
    Ok(())
}
