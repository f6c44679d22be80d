//! Safe wrappers over each kernel and GEMM of the fused loss, one method per operation. Each
//! method checks shapes and contexts, then enqueues work on the stream without waiting for it.
//!
//! Layout: every matrix is row-major, Z is N×D and C is D×D, exactly as in [`crate::cpu`], whose
//! functions are the CPU twins of these methods.

#[cfg(feature = "nccl")]
mod split;

use super::blas::{Blas, Operand};
use super::fatbin::LOSS;
use super::module::{kernels, Kernels};
use super::{alloc, check_available, check_context, check_i32, drv, Element, HatDtype, HatElement};
use crate::cpu::STATS_PER_COLUMN;
use crate::error::{Error, Result};
use crate::shape::{check_input, check_output, Dims};
use crate::{LossValue, Math};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use std::sync::Arc;

/// The loss module's kernels, as their sources declare them.
pub(crate) mod kernel {
    use super::super::launch::kernels;
    use super::super::{Dtype, Element, HatDtype, HatElement};
    use super::LOSS;
    use half::bf16;

    const fn std_fwd(t: Dtype, o: HatDtype) -> &'static str {
        match (t, o) {
            (Dtype::F32, HatDtype::F32) => "standardize_fwd_f32_f32",
            (Dtype::Bf16, HatDtype::F32) => "standardize_fwd_bf16_f32",
            (Dtype::F16, HatDtype::F32) => "standardize_fwd_f16_f32",
            (Dtype::F32, HatDtype::Bf16) => "standardize_fwd_f32_bf16",
            (Dtype::Bf16, HatDtype::Bf16) => "standardize_fwd_bf16_bf16",
            (Dtype::F16, HatDtype::Bf16) => "standardize_fwd_f16_bf16",
        }
    }

    const fn std_bwd(t: Dtype) -> &'static str {
        match t {
            Dtype::F32 => "standardize_bwd_f32",
            Dtype::Bf16 => "standardize_bwd_bf16",
            Dtype::F16 => "standardize_bwd_f16",
        }
    }

    const fn by_input(
        t: Dtype,
        f32_name: &'static str,
        bf16_name: &'static str,
        f16_name: &'static str,
    ) -> &'static str {
        match t {
            Dtype::F32 => f32_name,
            Dtype::Bf16 => bf16_name,
            Dtype::F16 => f16_name,
        }
    }

    const fn std_apply(t: Dtype, o: HatDtype) -> &'static str {
        match (t, o) {
            (Dtype::F32, HatDtype::F32) => "standardize_apply_f32_f32",
            (Dtype::Bf16, HatDtype::F32) => "standardize_apply_bf16_f32",
            (Dtype::F16, HatDtype::F32) => "standardize_apply_f16_f32",
            (Dtype::F32, HatDtype::Bf16) => "standardize_apply_f32_bf16",
            (Dtype::Bf16, HatDtype::Bf16) => "standardize_apply_bf16_bf16",
            (Dtype::F16, HatDtype::Bf16) => "standardize_apply_f16_bf16",
        }
    }

    const fn hat(o: HatDtype, f32_name: &'static str, bf16_name: &'static str) -> &'static str {
        match o {
            HatDtype::F32 => f32_name,
            HatDtype::Bf16 => bf16_name,
        }
    }

    kernels! {
        module: LOSS;
        /// Welford column statistics and Ẑ in one pass (standardize.cu).
        fn standardize_fwd<T: Element, O: HatElement>(
            z: &T, zhat: &mut O, stats: &mut f32, n: i64, d: i64, eps: f32, tf32: i32,
        ) = std_fwd(T::DTYPE, O::HAT);
        /// Backward through the standardization (standardize.cu).
        fn standardize_bwd<T: Element>(
            g: &f32, z: &T, stats: &f32, dz: &mut T, n: i64, d: i64,
        ) = std_bwd(T::DTYPE);
        /// Stage 1 of the fused reduction, dL/dC written over C when `write_grad`.
        fn loss_reduce_partial_f32(
            c: &mut f32, write_grad: i32, partials: &mut f32, d: i64, lambda: f32, vec: i32,
            tf32: i32,
        ) = "loss_reduce_partial_f32";
        /// Stage 1 of the fused reduction, dL/dC written as bf16 beside C.
        fn loss_reduce_partial_bf16(
            c: &f32, grad: &mut bf16, partials: &mut f32, d: i64, lambda: f32, vec: i32,
        ) = "loss_reduce_partial_bf16";
        /// Stage 2: both terms and the total in f64, one block.
        fn loss_reduce_final(partials: &f32, blocks: i64, lambda: f64, out: &mut f64)
            = "loss_reduce_final";
        /// Copies the last loss into caller-owned memory.
        fn loss_publish(out: &f64, dst: &mut f32, slots: i64) = "loss_publish";
        /// Cᵢᵢ's partial dots per chunk of rows, in f64 (gram.cu).
        fn gram_diag<T: HatElement>(
            a: &T, b: &T, part: &mut f64, n: i64, d: i64, rows_per_chunk: i64,
        ) = hat(T::HAT, "gram_diag_f32", "gram_diag_bf16");
        /// ⟨Ga, Gb⟩ partial sums; rounds both to TF32 in place when `tf32`.
        fn gram_dot_partial(ga: &mut f32, gb: &mut f32, partials: &mut f64, len: i64, tf32: i32)
            = "gram_dot_partial";
        /// Both terms from ⟨Ga, Gb⟩ and Cᵢᵢ, and the per-column coefficients kᵢ.
        fn gram_final(
            partials: &f64, blocks: i64, cii: &f64, chunks: i64, n: i64, d: i64, lambda: f64,
            out: &mut f64, coef: &mut f32,
        ) = "gram_final";
        /// `out = kᵢ·other`, the first term of the Gram path's gradient.
        fn gram_grad_init<T: HatElement>(other: &T, coef: &f32, out: &mut f32, n: i64, d: i64)
            = hat(T::HAT, "gram_grad_init_f32", "gram_grad_init_bf16");
        /// f32 → bf16, rounding to nearest.
        fn naive_cast_bf16(x: &f32, y: &mut bf16, len: i64) = "naive_cast_bf16";
        /// Σ z per column, in f64 (standardize_split.cu: a batch split across ranks).
        fn column_sums<T: Element>(z: &T, out: &mut f64, n: i64, d: i64)
            = by_input(T::DTYPE, "column_sums_f32", "column_sums_bf16", "column_sums_f16");
        /// Σ (z − mean)² per column, the mean from the ranks' summed column sums.
        fn centered_squares<T: Element>(
            z: &T, sums: &f64, inv_count: f64, out: &mut f64, n: i64, d: i64,
        ) = by_input(
            T::DTYPE, "centered_squares_f32", "centered_squares_bf16", "centered_squares_f16",
        );
        /// The statistics from the summed sums and squares, and Ẑ.
        fn standardize_apply<T: Element, O: HatElement>(
            z: &T, sums: &f64, sq: &f64, inv_count: f64, eps: f32, stats: &mut f32,
            zhat: &mut O, n: i64, d: i64, tf32: i32,
        ) = std_apply(T::DTYPE, O::HAT);
        /// Σ g and Σ g·x̂ per column, in f64.
        fn std_bwd_sums<T: Element>(g: &f32, z: &T, stats: &f32, out: &mut f64, n: i64, d: i64)
            = by_input(T::DTYPE, "std_bwd_sums_f32", "std_bwd_sums_bf16", "std_bwd_sums_f16");
        /// dz from the ranks' summed Σ g and Σ g·x̂.
        fn std_bwd_apply<T: Element>(
            g: &f32, z: &T, stats: &f32, sums: &f64, inv_count: f64, dz: &mut T, n: i64,
            d: i64,
        ) = by_input(T::DTYPE, "std_bwd_apply_f32", "std_bwd_apply_bf16", "std_bwd_apply_f16");
    }
}

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
        let tf32 = i32::from(math == Math::Tf32);
        // SAFETY: z and zhat hold N×D elements and stats 3·D floats (checked above); the kernel
        // touches rows < n and columns < d only.
        unsafe {
            kernel::standardize_fwd::<T, O>(
                &self.kernels,
                &self.stream,
                std_launch(d)?,
                z,
                zhat,
                stats,
                n as i64,
                d as i64,
                eps,
                tf32,
            )
        }
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
        // SAFETY: g, z and dz hold N×D elements and stats 3·D floats (checked above); dz is a
        // distinct mutable borrow.
        unsafe {
            kernel::standardize_bwd::<T>(
                &self.kernels,
                &self.stream,
                std_launch(d)?,
                g,
                z,
                stats,
                dz,
                n as i64,
                d as i64,
            )
        }
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
        dims.checked()?;
        self.cross_correlation_scaled(math, za_hat, zb_hat, dims, 1.0 / dims.n as f32, c)
    }

    /// `C = scale·Ẑaᵀ·Ẑb`: 1/N for one batch, 1/(all ranks' rows) for one rank's share (whose
    /// rows may be a single one; the caller checked the whole batch).
    pub(crate) fn cross_correlation_scaled<O: HatElement>(
        &mut self,
        math: Math,
        za_hat: &impl DevicePtr<O>,
        zb_hat: &impl DevicePtr<O>,
        dims: Dims,
        scale: f32,
        c: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (n, d) = self.check_hats(math, za_hat, zb_hat, dims)?;
        check_output("c", c.len(), d * d)?;
        let s = self.stream.clone();
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
                scale,
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

    /// What both correlation GEMMs check of Ẑa and Ẑb: the rows, the element type `math`
    /// reads, the lengths and the context; returns (N, D).
    fn check_hats<O: HatElement>(
        &self,
        math: Math,
        za_hat: &impl DevicePtr<O>,
        zb_hat: &impl DevicePtr<O>,
        dims: Dims,
    ) -> Result<(usize, usize)> {
        let nd = rows_checked(dims)?;
        check_math::<O>(math)?;
        check_input("za_hat", za_hat.len(), dims)?;
        check_input("zb_hat", zb_hat.len(), dims)?;
        check_context("za_hat", za_hat, &self.stream)?;
        check_context("zb_hat", zb_hat, &self.stream)?;
        Ok(nd)
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
        dims.checked()?;
        let s = 1.0 / dims.n as f32;
        self.correlation_backward_scaled(math, g, za_hat, zb_hat, dims, s, dza_hat, dzb_hat)
    }

    /// [`CudaOps::correlation_backward`] with the 1/N factor given (1/(all ranks' rows) for one
    /// rank's rows).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn correlation_backward_scaled<O: HatElement>(
        &mut self,
        math: Math,
        g: &impl DevicePtr<O>,
        za_hat: &impl DevicePtr<O>,
        zb_hat: &impl DevicePtr<O>,
        dims: Dims,
        inv_n: f32,
        dza_hat: &mut impl DevicePtrMut<f32>,
        dzb_hat: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (n, d) = self.check_hats(math, za_hat, zb_hat, dims)?;
        check_output("g", g.len(), d * d)?;
        check_output("dza_hat", dza_hat.len(), n * d)?;
        check_output("dzb_hat", dzb_hat.len(), n * d)?;
        let s = self.stream.clone();
        check_context("g", g, &s)?;
        check_context("dza_hat", dza_hat, &s)?;
        check_context("dzb_hat", dzb_hat, &s)?;
        self.blas.bind(&s)?;
        let (pg, _gg) = g.device_ptr(&s);
        let (pa, _ga) = za_hat.device_ptr(&s);
        let (pb, _gb) = zb_hat.device_ptr(&s);
        let (pda, _gda) = dza_hat.device_ptr_mut(&s);
        let (pdb, _gdb) = dzb_hat.device_ptr_mut(&s);
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
        check_lambda(lambda)?;
        let vec = d.is_multiple_of(4) && aligned16_mut(c, &self.stream);
        let cfg = reduce_launch(d, vec);
        // SAFETY: c holds D×D floats (checked above); the partials hold 2·MAX_REDUCE_BLOCKS ≥
        // 2·blocks floats; vec is set only when d % 4 == 0 and C is 16-byte aligned.
        unsafe {
            kernel::loss_reduce_partial_f32(
                &self.kernels,
                &self.stream,
                cfg,
                c,
                i32::from(write_grad),
                &mut self.partials,
                d as i64,
                lambda,
                i32::from(vec),
                i32::from(math == Math::Tf32),
            )?;
        }
        self.reduce_final(cfg, lambda)
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
        check_lambda(lambda)?;
        let s = &self.stream;
        let vec = d.is_multiple_of(4) && aligned16(c, s) && aligned16_mut(grad, s);
        let cfg = reduce_launch(d, vec);
        // SAFETY: c and grad hold D×D elements (checked above), grad a distinct mutable borrow;
        // the partials hold 2·MAX_REDUCE_BLOCKS ≥ 2·blocks floats; vec is set only when d % 4 ==
        // 0 and both are 16-byte aligned.
        unsafe {
            kernel::loss_reduce_partial_bf16(
                &self.kernels,
                s,
                cfg,
                c,
                grad,
                &mut self.partials,
                d as i64,
                lambda,
                i32::from(vec),
            )?;
        }
        self.reduce_final(cfg, lambda)
    }

    /// Stage 2 of the reduction, over the partial sums stage 1 left for the grid `stage1`.
    fn reduce_final(&mut self, stage1: LaunchConfig, lambda: f32) -> Result<()> {
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            ..stage1
        };
        // SAFETY: the partials hold the 2·blocks values stage 1 wrote, out 3 doubles.
        unsafe {
            kernel::loss_reduce_final(
                &self.kernels,
                &self.stream,
                one,
                &self.partials,
                i64::from(stage1.grid_dim.0),
                f64::from(lambda),
                &mut self.out,
            )
        }
    }

    /// `g = ẑ·ẑᵀ` (N×N, f32) through cuBLAS, for the Gram path.
    pub fn gram<O: HatElement>(
        &mut self,
        math: Math,
        z_hat: &impl DevicePtr<O>,
        dims: Dims,
        g: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        self.gram_rows(math, z_hat, dims.n, z_hat, dims, g)
    }

    /// The rows of the Gram matrix that `rows` (`n` rows of ẑ, this rank's) make with every row
    /// of `all` (N×D): `g = rows·allᵀ`, n×N f32, row-major. With `rows` = `all` it is the whole
    /// (symmetric) Gram matrix.
    pub(crate) fn gram_rows<O: HatElement>(
        &mut self,
        math: Math,
        rows: &impl DevicePtr<O>,
        n: usize,
        all: &impl DevicePtr<O>,
        dims: Dims,
        g: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (total, d) = dims.checked()?;
        check_math::<O>(math)?;
        check_input("z_hat", all.len(), dims)?;
        check_input("z_hat rows", rows.len(), Dims::new(n, d))?;
        check_output("g", g.len(), n * total)?;
        let s = self.stream.clone();
        check_context("z_hat", all, &s)?;
        check_context("z_hat rows", rows, &s)?;
        check_context("g", g, &s)?;
        self.blas.bind(&s)?;
        let (pa, _ga) = all.device_ptr(&s);
        let (pr, _gr) = rows.device_ptr(&s);
        let (pg, _gg) = g.device_ptr_mut(&s);
        // Column-major, a row-major ẑ buffer is ẑᵀ (D×N): gᵀ (N×n) = (allᵀ)ᵀ·rowsᵀ, which is the
        // row-major n×N block.
        // SAFETY: `all` holds N×D and `rows` n×D elements of the type `math` implies, g n×N floats
        // (checked above), all in this context; g is a distinct mutable borrow.
        unsafe {
            self.blas.gemm(
                math,
                total,
                n,
                d,
                1.0,
                Operand {
                    ptr: pa,
                    ld: d,
                    trans: true,
                },
                Operand {
                    ptr: pr,
                    ld: d,
                    trans: false,
                },
                0.0,
                pg,
                total,
            )
        }
    }

    /// Scratch for D columns whose Cᵢᵢ comes in `chunks` partial dots each.
    fn gram_scratch(&mut self, d: usize, chunks: usize) -> Result<()> {
        let fits = self
            .gram
            .as_ref()
            .is_some_and(|g| g.cii.len() >= chunks * d && g.coef.len() >= d);
        if !fits {
            let s = self.stream.clone();
            let what = "allocating Gram-path scratch";
            // Freed before the larger one is made.
            self.gram = None;
            self.gram = Some(GramScratch {
                partials: alloc(&s, MAX_REDUCE_BLOCKS, what)?,
                cii: alloc(&s, chunks * d, what)?,
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
        ga: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        gb: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        dims: Dims,
        lambda: f32,
        grads: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
        g16: Option<(&mut CudaSlice<half::bf16>, &mut CudaSlice<half::bf16>)>,
    ) -> Result<()> {
        let rows = GramRows {
            za: za_hat,
            zb: zb_hat,
            n: dims.n,
            sum: None,
        };
        self.gram_loss_rows(math, rows, za_hat, zb_hat, ga, gb, dims, lambda, grads, g16)
    }

    /// [`CudaOps::gram_loss`] for one rank's rows of a gathered batch: `za_all`, `zb_all` hold
    /// all N rows, `rows` this rank's n of them, `ga`, `gb` their n×N Gram blocks
    /// ([`CudaOps::gram_rows`]). The ⟨Ga, Gb⟩ partial sums go through `rows.sum` (the ranks'
    /// all-reduce) before the loss is formed; the gradients are those of this rank's rows (n×D).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gram_loss_rows<O: HatElement, A: DevicePtr<O>, B: DevicePtr<O>>(
        &mut self,
        math: Math,
        rows: GramRows<'_, A, B>,
        za_all: &impl DevicePtr<O>,
        zb_all: &impl DevicePtr<O>,
        ga: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        gb: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        dims: Dims,
        lambda: f32,
        grads: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
        g16: Option<(&mut CudaSlice<half::bf16>, &mut CudaSlice<half::bf16>)>,
    ) -> Result<()> {
        let GramRows {
            za: za_rows,
            zb: zb_rows,
            n: rn,
            sum,
        } = rows;
        let (n, d) = dims.checked()?;
        check_math::<O>(math)?;
        check_input("za_hat", za_all.len(), dims)?;
        check_input("zb_hat", zb_all.len(), dims)?;
        if rn == 0 || rn > n {
            return Err(Error::InvalidConfig(format!(
                "{rn} rows of a Gram block of a batch of {n}"
            )));
        }
        check_input("za_hat rows", za_rows.len(), Dims::new(rn, d))?;
        check_input("zb_hat rows", zb_rows.len(), Dims::new(rn, d))?;
        check_output("ga", ga.len(), rn * n)?;
        check_output("gb", gb.len(), rn * n)?;
        check_lambda(lambda)?;
        let s = self.stream.clone();
        check_context("za_hat", za_all, &s)?;
        check_context("zb_hat", zb_all, &s)?;
        check_context("za_hat rows", za_rows, &s)?;
        check_context("zb_hat rows", zb_rows, &s)?;
        check_context("ga", ga, &s)?;
        check_context("gb", gb, &s)?;
        let diag = diag_launch(n, d)?;
        let chunks = diag.grid_dim.1 as usize;
        let rows_per_chunk = n.div_ceil(chunks) as i64;
        self.gram_scratch(d, chunks)?;
        self.blas.bind(&s)?;
        let (n64, d64, block64) = (n as i64, d as i64, (rn * n) as i64);
        let kernels = self.kernels.clone();
        let GramScratch {
            partials,
            cii,
            coef,
        } = self.gram.as_mut().ok_or_else(|| Error::Cuda {
            during: "the Gram path".into(),
            message: "scratch missing after allocation".into(),
        })?;

        // Cᵢᵢ of the whole batch (every rank computes it: D dot products of length N), as
        // partial dots over chunks of rows.
        // SAFETY: Ẑa, Ẑb hold N×D elements (checked above), the partials chunks×D doubles
        // (gram_scratch); one block column per 32 columns, one block row per chunk of
        // rows_per_chunk rows, the chunks covering 0..N.
        unsafe {
            kernel::gram_diag::<O>(
                &kernels,
                &s,
                diag,
                za_all,
                zb_all,
                cii,
                n64,
                d64,
                rows_per_chunk,
            )?;
        }

        // ⟨Ga, Gb⟩ over this block in f64 partials (summed over the ranks), then the final
        // one-block reduction. The partials' count depends on the block's size alone, the same
        // on every rank.
        let per_block = REDUCE_THREADS as usize * REDUCE_ITEMS_PER_THREAD;
        let blocks = (rn * n).div_ceil(per_block).clamp(1, MAX_REDUCE_BLOCKS);
        let tf32 = i32::from(math == Math::Tf32 && grads.is_some());
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: Ga, Gb hold n×N floats (checked above) and are distinct mutable borrows; the
        // partials hold MAX_REDUCE_BLOCKS ≥ blocks doubles.
        unsafe { kernel::gram_dot_partial(&kernels, &s, cfg, ga, gb, partials, block64, tf32)? };
        if let Some(sum) = sum {
            sum(&mut partials.slice_mut(..blocks))?;
        }
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            ..cfg
        };
        // SAFETY: the partials hold the `blocks` sums just written, Cᵢᵢ's partials chunks×D
        // doubles, out 3 doubles, coef D floats.
        unsafe {
            kernel::gram_final(
                &kernels,
                &s,
                one,
                partials,
                blocks as i64,
                cii,
                chunks as i64,
                n64,
                d64,
                f64::from(lambda),
                &mut self.out,
                coef,
            )?;
        }

        let Some((da, db)) = grads else { return Ok(()) };
        check_output("dza_hat", da.len(), rn * d)?;
        check_output("dzb_hat", db.len(), rn * d)?;
        check_context("dza_hat", &*da, &s)?;
        check_context("dzb_hat", &*db, &s)?;
        let scale = (2.0 * f64::from(lambda) / (n as f64 * n as f64)) as f32;
        // The bf16 GEMMs read the Gram blocks in bf16.
        let g16 = match (math, g16) {
            (Math::Bf16, Some((a16, b16))) => {
                check_output("ga16", a16.len(), rn * n)?;
                check_output("gb16", b16.len(), rn * n)?;
                let blocks =
                    u32::try_from((rn * n).div_ceil(256)).map_err(|_| Error::TooLarge {
                        what: format!("n×N = {} elements for the bf16 Gram copies", rn * n),
                    })?;
                let cast = LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: Ga and its bf16 copy hold n×N elements each (checked above).
                unsafe { kernel::naive_cast_bf16(&kernels, &s, cast, ga, a16, block64)? };
                // SAFETY: as above, for Gb.
                unsafe { kernel::naive_cast_bf16(&kernels, &s, cast, gb, b16, block64)? };
                Some((a16, b16))
            }
            (Math::Bf16, None) => {
                return Err(Error::InvalidConfig(
                    "bf16 Gram gradients need bf16 Gram buffers".into(),
                ))
            }
            _ => None,
        };
        let init = LaunchConfig {
            grid_dim: ((rn * d).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // dẐa = kᵢ·Ẑb + s·Gb·Ẑa ;  dẐb = kᵢ·Ẑa + s·Ga·Ẑb, for this block's rows.
        let (shape, blas) = ((rn, n, d), &self.blas);
        for side in [0, 1] {
            let (pg, _gg) = match (&g16, side) {
                (Some((_, b16)), 0) => b16.device_ptr(&s),
                (Some((a16, _)), _) => a16.device_ptr(&s),
                (None, 0) => gb.device_ptr(&s),
                (None, _) => ga.device_ptr(&s),
            };
            if side == 0 {
                gram_grad_term(
                    blas, &kernels, &s, math, shape, scale, init, coef, da, zb_rows, za_all, pg,
                )?;
            } else {
                gram_grad_term(
                    blas, &kernels, &s, math, shape, scale, init, coef, db, za_rows, zb_all, pg,
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
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `out` holds 3 doubles written by the last reduction on this stream, `dst` at
        // least `slots` floats.
        unsafe { kernel::loss_publish(&self.kernels, s, cfg, &self.out, dst, slots) }
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

/// `gram_diag`'s grid: a block column per 32 columns and enough chunks of rows for at least 4
/// blocks per SM of an H100 (132 SMs), each chunk at least one row per row group.
fn diag_launch(n: usize, d: usize) -> Result<LaunchConfig> {
    let mut cfg = std_launch(d)?;
    let columns = cfg.grid_dim.0 as usize;
    let wanted = (4 * 132usize).div_ceil(columns);
    let rows = n.div_ceil(wanted).max(STD_ROWS as usize);
    cfg.grid_dim.1 = n.div_ceil(rows).max(1) as u32;
    Ok(cfg)
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

/// One side of the Gram path's gradient: `out = kᵢ·other + scale·own·G`, G the N×N Gram matrix
/// of the other side at `g` (held by the caller for the call).
#[allow(clippy::too_many_arguments)]
fn gram_grad_term<O: HatElement>(
    blas: &Blas,
    kernels: &Kernels,
    s: &Arc<CudaStream>,
    math: Math,
    (rn, n, d): (usize, usize, usize),
    scale: f32,
    init: LaunchConfig,
    coef: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    other: &impl DevicePtr<O>,
    own: &impl DevicePtr<O>,
    g: u64,
) -> Result<()> {
    // SAFETY: `other` (this block's rows) and `out` hold n×D elements and coef D floats (checked
    // by `gram_loss_rows`).
    unsafe {
        kernel::gram_grad_init::<O>(kernels, s, init, other, coef, out, rn as i64, d as i64)?
    };
    let (po, _go) = out.device_ptr_mut(s);
    let (pown, _gown) = own.device_ptr(s);
    // Column-major: outᵀ (D×n) += scale · ownᵀ (D×N) · Gᵀ (N×n, the row-major n×N block).
    // SAFETY: own holds N×D elements, G n×N (of the type `math` implies), out n×D floats, all in
    // this context; out is a distinct mutable borrow.
    unsafe {
        blas.gemm(
            math,
            d,
            rn,
            n,
            scale,
            Operand {
                ptr: pown,
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
        )
    }
}

/// One rank's rows for [`CudaOps::gram_loss_rows`]: Ẑa and Ẑb of its `n` rows, and how the
/// ranks' partial sums of ⟨Ga, Gb⟩ are summed (none on one device).
pub(crate) struct GramRows<'a, A, B> {
    pub(crate) za: &'a A,
    pub(crate) zb: &'a B,
    pub(crate) n: usize,
    #[allow(clippy::type_complexity)]
    pub(crate) sum:
        Option<&'a mut dyn FnMut(&mut cudarc::driver::CudaViewMut<'_, f64>) -> Result<()>>,
}

/// Stage 1's grid: sized by D alone, so the partial sums (and the loss) are the same run to run.
fn reduce_launch(d: usize, vec: bool) -> LaunchConfig {
    let items = if vec { d * d / 4 } else { d * d };
    let per_block = REDUCE_THREADS as usize * REDUCE_ITEMS_PER_THREAD;
    // At least four blocks per SM of an H100 (132 SMs) while every thread still has an item, so
    // a small C (D = 2048) does not leave SMs idle.
    let floor = (4 * 132).min(items.div_ceil(REDUCE_THREADS as usize));
    let blocks = items
        .div_ceil(per_block)
        .max(floor)
        .clamp(1, MAX_REDUCE_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether a buffer starts on a 16-byte boundary (float4 loads need it; a view may start
/// anywhere).
fn aligned16<T>(buf: &impl DevicePtr<T>, stream: &CudaStream) -> bool {
    let (p, _guard) = buf.device_ptr(stream);
    p % 16 == 0
}

fn aligned16_mut<T>(buf: &mut impl DevicePtrMut<T>, stream: &CudaStream) -> bool {
    let (p, _guard) = buf.device_ptr_mut(stream);
    p % 16 == 0
}

fn check_lambda(lambda: f32) -> Result<()> {
    if !lambda.is_finite() {
        return Err(Error::InvalidConfig(format!(
            "lambda = {lambda} is not finite"
        )));
    }
    Ok(())
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

/// One rank's rows: at least one (the whole batch, checked by the caller, has two or more), at
/// least one column, and sizes that fit.
pub(crate) fn rows_checked(dims: Dims) -> Result<(usize, usize)> {
    if dims.n == 0 {
        return Err(Error::BatchTooSmall { n: 0 });
    }
    // Dims::checked with N ≥ 2 covers every other condition (and overflow) for N ≥ 1 rows.
    Dims::new(dims.n.max(2), dims.d).checked()?;
    Ok((dims.n, dims.d))
}
