//! Safe wrappers over the trainer's kernels (batch norm, pooling, conversions, LARS) and its
//! linear layers (cuBLAS), one method per operation. Activations are NHWC: an image batch is an
//! M×C row-major matrix with M = N·H·W, which is also how the projector's N×C features look, so
//! one set of batch-norm kernels serves both.
//!
//! Every method checks its buffers' lengths and contexts, then queues work on the stream without
//! waiting. The CPU twins are the layers of [`crate::nn`] (NCHW); the tests compare the two.

use super::blas::{Blas, Operand};
use super::fatbin::TRAIN;
use super::module::{kernels, Kernels};
use super::{alloc, check_available, check_context, drv, Act};
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cudaDataType};
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice,
    LaunchConfig,
};
use half::bf16;
use std::sync::Arc;

/// The trainer's kernels, as their sources declare them.
mod kernel {
    use super::super::launch::kernels;
    use super::super::{Act, Dtype};
    use super::TRAIN;
    use half::bf16;

    /// The instantiation for an activation type (f32 or bf16; activations are never f16).
    const fn act(t: Dtype, f32_name: &'static str, bf16_name: &'static str) -> &'static str {
        match t {
            Dtype::F32 => f32_name,
            Dtype::Bf16 => bf16_name,
            Dtype::F16 => panic!("the trainer's kernels have no f16 instantiation"),
        }
    }

    kernels! {
        module: TRAIN;
        /// Per-chunk column sums for the batch statistics (batchnorm.cu).
        fn bn_stats_partial<A: Act>(x: &A, partial: &mut f32, m: i64, c: i64, rpc: i64)
            = act(A::DTYPE, "bn_stats_partial_f32", "bn_stats_partial_bf16");
        /// Mean and rstd from the partial sums; moves the running statistics.
        fn bn_stats_final<A: Act>(
            x: &A, partial: &f32, chunks: i64, m: i64, c: i64, eps: f32, momentum: f32,
            update_running: i32, mean: &mut f32, rstd: &mut f32, running_mean: &mut f32,
            running_var: &mut f32,
        ) = act(A::DTYPE, "bn_stats_final_f32", "bn_stats_final_bf16");
        /// Mean and rstd from the running statistics.
        fn bn_eval_stats(
            running_mean: &f32, running_var: &f32, c: i64, eps: f32, mean: &mut f32,
            rstd: &mut f32,
        ) = "bn_eval_stats";
        /// `y = act(x̂·γ + β (+ residual))`.
        fn bn_apply<A: Act>(
            x: &A, mean: &f32, rstd: &f32, gamma: &f32, beta: &f32, residual: Option<&A>,
            y: &mut A, m: i64, c: i64, relu: i32,
        ) = act(A::DTYPE, "bn_apply_f32", "bn_apply_bf16");
        /// Per-chunk sums of the backward.
        fn bn_bwd_partial<A: Act>(
            dy: &A, y: Option<&A>, x: &A, mean: &f32, rstd: &f32, partial: &mut f32, m: i64,
            c: i64, rpc: i64,
        ) = act(A::DTYPE, "bn_bwd_partial_f32", "bn_bwd_partial_bf16");
        /// dγ, dβ and the per-channel coefficients of dx.
        fn bn_bwd_final(
            partial: &f32, chunks: i64, m: i64, c: i64, dgamma: &mut f32, dbeta: &mut f32,
            coef: &mut f32,
        ) = "bn_bwd_final";
        /// dx, and the residual's gradient (written or added).
        fn bn_bwd_apply<A: Act>(
            dy: &A, y: Option<&A>, x: &A, mean: &f32, rstd: &f32, gamma: &f32, coef: &f32,
            dx: &mut A, dres: Option<&mut A>, accum_res: i32, m: i64, c: i64,
        ) = act(A::DTYPE, "bn_bwd_apply_f32", "bn_bwd_apply_bf16");
        /// The projector's affine standardization (projector_norm.cu).
        fn standardize_affine_fwd<A: Act>(
            z: &A, y: &mut A, stats: &mut f32, n: i64, d: i64, eps: f32, gamma: &f32,
            beta: &f32, relu: i32, momentum: f32, running_mean: &mut f32,
            running_var: &mut f32,
        ) = act(A::DTYPE, "standardize_affine_fwd_f32", "standardize_affine_fwd_bf16");
        /// Its backward in one launch.
        fn standardize_affine_bwd<A: Act>(
            dy: &A, y: Option<&A>, z: &A, stats: &f32, gamma: &f32, dz: &mut A,
            dgamma: &mut f32, dbeta: &mut f32, n: i64, d: i64,
        ) = act(A::DTYPE, "standardize_affine_bwd_f32", "standardize_affine_bwd_bf16");
        /// 3×3 stride-2 max-pool with the winning positions (pool.cu).
        fn maxpool_fwd<A: Act>(
            x: &A, y: &mut A, arg: &mut u8, n: i64, h: i64, w: i64, c: i64, ho: i64, wo: i64,
        ) = act(A::DTYPE, "maxpool_fwd_f32", "maxpool_fwd_bf16");
        /// Its backward.
        fn maxpool_bwd<A: Act>(
            dy: &A, arg: &u8, dx: &mut A, n: i64, h: i64, w: i64, c: i64, ho: i64, wo: i64,
        ) = act(A::DTYPE, "maxpool_bwd_f32", "maxpool_bwd_bf16");
        /// Global average pool.
        fn avgpool_fwd<A: Act>(x: &A, y: &mut A, n: i64, hw: i64, c: i64)
            = act(A::DTYPE, "avgpool_fwd_f32", "avgpool_fwd_bf16");
        /// Its backward.
        fn avgpool_bwd<A: Act>(dy: &A, dx: &mut A, n: i64, hw: i64, c: i64)
            = act(A::DTYPE, "avgpool_bwd_f32", "avgpool_bwd_bf16");
        /// f32 → bf16 (convert.cu).
        fn cast_f32_bf16(src: &f32, dst: &mut bf16, n: i64) = "cast_f32_bf16";
        /// `dst += src` into f32.
        fn accumulate<A: Act>(src: &A, dst: &mut f32, n: i64)
            = act(A::DTYPE, "accumulate_f32_f32", "accumulate_bf16_f32");
        /// LARS stage 1: per-chunk Σw², Σd² (lars.cu).
        fn lars_partial(
            w: &f32, g: &f32, chunk_start: &i64, chunk_len: &i32, chunk_tensor: &i32,
            tensor_vector: &i32, wd: f32, partial: &mut f32,
        ) = "lars_partial";
        /// LARS stage 2: the trust ratio per tensor.
        fn lars_trust(
            partial: &f32, first_chunk: &i32, n_chunks: &i32, tensor_vector: &i32, tensors: i64,
            eta: f32, trust: &mut f32,
        ) = "lars_trust";
        /// LARS stage 3: the update and the working copy.
        fn lars_update<A: Act>(
            w: &mut f32, g: &f32, mom: &mut f32, chunk_start: &i64, chunk_len: &i32,
            chunk_tensor: &i32, tensor_vector: &i32, trust: &f32, wd: f32, lr_weights: f32,
            lr_biases: f32, momentum: f32, work: &mut A,
        ) = act(A::DTYPE, "lars_update_f32", "lars_update_bf16");
    }
}

/// Threads of the elementwise kernels' blocks.
const THREADS: u32 = 256;
/// Column tile of the batch-norm reductions (matches `COLS`, `ROWS` in `common.cuh`).
const COLS: usize = 32;
const ROWS: u32 = 8;
/// Target number of blocks for a reduction, split between column tiles and row chunks.
const REDUCE_BLOCKS: usize = 1024;
/// Fewest rows worth a chunk of their own.
const MIN_CHUNK_ROWS: usize = 64;
/// Largest LARS chunk (elements per block).
pub const LARS_CHUNK: usize = 1 << 16;

/// How a batch norm gets its statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormMode {
    /// Batch statistics; the running statistics move by `momentum`.
    Train {
        /// Weight of the batch in the running statistics (0.1 in PyTorch).
        momentum: f32,
    },
    /// The running statistics.
    Eval,
}

/// Rows per chunk and chunk count of a batch-norm reduction over an M×C matrix: a function of the
/// shape alone, so the summation order (and the result) never varies.
pub fn norm_chunks(m: usize, c: usize) -> (usize, usize) {
    let tiles = c.div_ceil(COLS).max(1);
    let target = (REDUCE_BLOCKS / tiles).max(1);
    let chunks = target.min(m.div_ceil(MIN_CHUNK_ROWS)).max(1);
    let rows = m.div_ceil(chunks).max(1);
    (rows, m.div_ceil(rows).max(1))
}

fn grid(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch shape of the row-and-channel kernels over `rows` rows of `c` channels: a block is
/// (channels, rows) = (the power of two ≥ c, clamped to 32..256) × (256 / that), and the grid
/// strides over the rows.
pub fn rows_grid(rows: usize, c: usize) -> LaunchConfig {
    let bx = c.next_power_of_two().clamp(32, THREADS as usize) as u32;
    let by = THREADS / bx;
    let blocks = rows.div_ceil(by as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (bx, by, 1),
        shared_mem_bytes: 0,
    }
}

/// Pooling kernels find a row's position with 32-bit divisions.
fn check_rows(rows: usize) -> Result<()> {
    if rows >= 1 << 31 {
        return Err(Error::TooLarge {
            what: format!("{rows} pixel positions in one pooling call (the limit is 2^31)"),
        });
    }
    Ok(())
}

/// The standardization kernels' grid: one block of COLS×ROWS threads per COLS columns.
fn std_grid(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(COLS) as u32, 1, 1),
        block_dim: (COLS as u32, ROWS, 1),
        shared_mem_bytes: 0,
    }
}

fn need<T>(name: &'static str, buf: &impl DeviceSlice<T>, len: usize) -> Result<()> {
    if buf.len() < len {
        return Err(Error::BufferTooSmall {
            name,
            len: buf.len(),
            needed: len,
        });
    }
    Ok(())
}

/// Per-layer batch-norm statistics kept from the forward for the backward: [mean | rstd] (2·C
/// floats) from the batch-norm kernels, [mean_hi | mean_lo | rstd] (3·C) from the
/// standardization kernels.
pub type NormStats = CudaSlice<f32>;

/// The kernels, a cuBLAS handle and reduction scratch, bound to one stream.
pub struct NnOps {
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    blas: Blas,
    partial: Option<CudaSlice<f32>>,
    coef: Option<CudaSlice<f32>>,
}

impl NnOps {
    /// Loads the trainer's kernels into the stream's context and binds a cuBLAS handle to the
    /// stream; fails when CUDA or the kernels are unavailable.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        check_available()?;
        Ok(Self {
            stream: stream.clone(),
            kernels: kernels(stream.context(), &TRAIN)?,
            blas: Blas::new(stream)?,
            partial: None,
            coef: None,
        })
    }

    /// The stream every operation is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn ctx<T>(&self, name: &'static str, buf: &impl DeviceSlice<T>) -> Result<()> {
        check_context(name, buf, &self.stream)
    }

    /// Reduction scratch of at least `len` floats (grown, never shrunk).
    fn scratch<'a>(
        slot: &'a mut Option<CudaSlice<f32>>,
        s: &Arc<CudaStream>,
        len: usize,
    ) -> Result<&'a mut CudaSlice<f32>> {
        if slot.as_ref().is_none_or(|p| p.len() < len) {
            // The old buffer goes first, so the two never take memory at once.
            *slot = None;
            *slot = Some(alloc(s, len, "allocating batch-norm scratch")?);
        }
        slot.as_mut().ok_or_else(|| Error::Cuda {
            during: "batch norm".into(),
            message: "scratch missing after allocation".into(),
        })
    }

    /// Batch norm over the M rows of x (M×C): `y = act(x̂·γ + β (+ residual))` with ReLU when
    /// `relu`. `gb` holds [γ | β], `running` [mean | var] (updated in training), `stats` receives
    /// [mean | rstd] for the backward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_forward<A: Act>(
        &mut self,
        mode: NormMode,
        eps: f32,
        (m, c): (usize, usize),
        x: &CudaView<'_, A>,
        gb: &CudaView<'_, f32>,
        running: &mut CudaViewMut<'_, f32>,
        residual: Option<&CudaView<'_, A>>,
        relu: bool,
        y: &mut CudaViewMut<'_, A>,
        stats: &mut NormStats,
    ) -> Result<()> {
        if m == 0 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "batch norm over an empty {m}×{c} input"
            )));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(Error::InvalidConfig(format!("batch norm eps = {eps}")));
        }
        need("x", x, m * c)?;
        need("y", y, m * c)?;
        need("gamma/beta", gb, 2 * c)?;
        need("running statistics", running, 2 * c)?;
        need("stats", stats, 2 * c)?;
        if let Some(r) = residual {
            need("residual", r, m * c)?;
            self.ctx("residual", r)?;
        }
        self.ctx("x", x)?;
        self.ctx("y", y)?;
        self.ctx("gamma/beta", gb)?;
        self.ctx("running statistics", running)?;
        self.ctx("stats", stats)?;
        let s = self.stream.clone();
        let (m64, c64) = (m as i64, c as i64);
        let (mut mean, mut rstd) = stats.split_at_mut(c);
        let (gamma, beta) = gb.split_at(c);
        let (mut running_mean, mut running_var) = running.split_at_mut(c);
        let small = LaunchConfig {
            grid_dim: (c.div_ceil(THREADS as usize) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        match mode {
            NormMode::Train { momentum } => {
                let (rows, chunks) = norm_chunks(m, c);
                let partial = Self::scratch(&mut self.partial, &s, 3 * chunks * c)?;
                let cfg = LaunchConfig {
                    grid_dim: (c.div_ceil(COLS) as u32, chunks as u32, 1),
                    block_dim: (COLS as u32, ROWS, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: x holds M×C elements, the scratch 3·chunks·C floats, and the grid has
                // `chunks` rows of `rows` rows each, covering exactly 0..M.
                unsafe {
                    kernel::bn_stats_partial::<A>(
                        &self.kernels,
                        &s,
                        cfg,
                        x,
                        partial,
                        m64,
                        c64,
                        rows as i64,
                    )?;
                }
                // SAFETY: the partial sums just written; mean, rstd and the running statistics
                // are C-float halves of their 2·C buffers; one thread per channel.
                unsafe {
                    kernel::bn_stats_final::<A>(
                        &self.kernels,
                        &s,
                        small,
                        x,
                        partial,
                        chunks as i64,
                        m64,
                        c64,
                        eps,
                        momentum,
                        1,
                        &mut mean,
                        &mut rstd,
                        &mut running_mean,
                        &mut running_var,
                    )?;
                }
            }
            NormMode::Eval => {
                // SAFETY: every argument holds C floats; one thread per channel.
                unsafe {
                    kernel::bn_eval_stats(
                        &self.kernels,
                        &s,
                        small,
                        &running_mean,
                        &running_var,
                        c64,
                        eps,
                        &mut mean,
                        &mut rstd,
                    )?;
                }
            }
        }
        // SAFETY: x, y and the residual (if any) hold M×C elements, the per-channel arrays C
        // floats; y is a distinct mutable borrow; the row and channel loops stay below M and C.
        unsafe {
            kernel::bn_apply::<A>(
                &self.kernels,
                &s,
                rows_grid(m, c),
                x,
                &mean,
                &rstd,
                &gamma,
                &beta,
                residual,
                y,
                m64,
                c64,
                i32::from(relu),
            )
        }
    }

    /// Backward of [`NnOps::batch_norm_forward`] in training mode: `dgb` ([dγ | dβ]) is
    /// accumulated, `dx` written, and the residual's gradient written to `dres` (or added to it
    /// when `accumulate_res`). `y` is the forward's output, whose sign masks dy when `relu`.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_backward<A: Act>(
        &mut self,
        (m, c): (usize, usize),
        dy: &CudaView<'_, A>,
        y: Option<&CudaView<'_, A>>,
        x: &CudaView<'_, A>,
        stats: &NormStats,
        gb: &CudaView<'_, f32>,
        dgb: &mut CudaViewMut<'_, f32>,
        dx: &mut CudaViewMut<'_, A>,
        dres: Option<(&mut CudaViewMut<'_, A>, bool)>,
    ) -> Result<()> {
        if m == 0 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "batch norm over an empty {m}×{c} input"
            )));
        }
        need("dy", dy, m * c)?;
        need("x", x, m * c)?;
        need("dx", dx, m * c)?;
        need("stats", stats, 2 * c)?;
        need("gamma/beta", gb, 2 * c)?;
        need("dgamma/dbeta", dgb, 2 * c)?;
        self.ctx("dy", dy)?;
        self.ctx("x", x)?;
        self.ctx("dx", dx)?;
        self.ctx("stats", stats)?;
        self.ctx("gamma/beta", gb)?;
        self.ctx("dgamma/dbeta", dgb)?;
        if let Some(y) = y {
            need("y", y, m * c)?;
            self.ctx("y", y)?;
        }
        if let Some((r, _)) = &dres {
            need("dres", *r, m * c)?;
            self.ctx("dres", *r)?;
        }
        let s = self.stream.clone();
        let (m64, c64) = (m as i64, c as i64);
        let (rows, chunks) = norm_chunks(m, c);
        let partial = Self::scratch(&mut self.partial, &s, 2 * chunks * c)?;
        let coef = Self::scratch(&mut self.coef, &s, 2 * c)?;
        let (mean, rstd) = stats.split_at(c);
        let (gamma, _) = gb.split_at(c);
        let (mut dgamma, mut dbeta) = dgb.split_at_mut(c);
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(COLS) as u32, chunks as u32, 1),
            block_dim: (COLS as u32, ROWS, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dy, y (if any) and x hold M×C elements, mean and rstd C floats, the scratch
        // 2·chunks·C floats; chunks × rows covers 0..M.
        unsafe {
            kernel::bn_bwd_partial::<A>(
                &self.kernels,
                &s,
                cfg,
                dy,
                y,
                x,
                &mean,
                &rstd,
                partial,
                m64,
                c64,
                rows as i64,
            )?;
        }
        let small = LaunchConfig {
            grid_dim: (c.div_ceil(THREADS as usize) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: dγ and dβ are the two C-float halves of dgb, coef holds 2·C floats; one thread
        // per channel.
        unsafe {
            kernel::bn_bwd_final(
                &self.kernels,
                &s,
                small,
                partial,
                chunks as i64,
                m64,
                c64,
                &mut dgamma,
                &mut dbeta,
                coef,
            )?;
        }
        let (dres, accum) = match dres {
            Some((r, acc)) => (Some(r), i32::from(acc)),
            None => (None, 0),
        };
        // SAFETY: every M×C buffer was checked; dx and dres are distinct mutable borrows from
        // each other and from dy, y and x.
        unsafe {
            kernel::bn_bwd_apply::<A>(
                &self.kernels,
                &s,
                rows_grid(m, c),
                dy,
                y,
                x,
                &mean,
                &rstd,
                &gamma,
                coef,
                dx,
                dres,
                accum,
                m64,
                c64,
            )
        }
    }

    /// The projector's batch norm in training mode: the loss's fused column standardization
    /// (Welford on shifted values, the mean kept as an f32 pair) with its affine variant,
    /// `y = act(x̂·γ + β)`, over N×C features; one block per 32 columns covers all rows. `gb` is
    /// [γ | β], `running` [mean | var] (moved by `momentum`), `stats` receives 3·C floats
    /// ([mean_hi | mean_lo | rstd]) for [`NnOps::standardize_affine_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn standardize_affine_forward<A: Act>(
        &self,
        eps: f32,
        momentum: f32,
        (n, c): (usize, usize),
        x: &CudaView<'_, A>,
        gb: &CudaView<'_, f32>,
        running: &mut CudaViewMut<'_, f32>,
        relu: bool,
        y: &mut CudaViewMut<'_, A>,
        stats: &mut NormStats,
    ) -> Result<()> {
        if n == 0 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "batch norm over an empty {n}×{c} input"
            )));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(Error::InvalidConfig(format!("batch norm eps = {eps}")));
        }
        need("x", x, n * c)?;
        need("y", y, n * c)?;
        need("gamma/beta", gb, 2 * c)?;
        need("running statistics", running, 2 * c)?;
        need("stats", stats, 3 * c)?;
        self.ctx("x", x)?;
        self.ctx("y", y)?;
        self.ctx("gamma/beta", gb)?;
        self.ctx("running statistics", running)?;
        self.ctx("stats", stats)?;
        let (gamma, beta) = gb.split_at(c);
        let (mut running_mean, mut running_var) = running.split_at_mut(c);
        // SAFETY: x and y hold N×C elements, stats 3·C floats, γ/β and mean/var are the C-float
        // halves of their 2·C views; the kernel touches columns < C and rows < N only.
        unsafe {
            kernel::standardize_affine_fwd::<A>(
                &self.kernels,
                &self.stream,
                std_grid(c),
                x,
                y,
                stats,
                n as i64,
                c as i64,
                eps,
                &gamma,
                &beta,
                i32::from(relu),
                momentum,
                &mut running_mean,
                &mut running_var,
            )
        }
    }

    /// Backward of [`NnOps::standardize_affine_forward`] in one launch: `dgb` ([dγ | dβ])
    /// accumulates, `dx` is written; `y` (the forward's output) masks dy when the norm had a ReLU.
    #[allow(clippy::too_many_arguments)]
    pub fn standardize_affine_backward<A: Act>(
        &self,
        (n, c): (usize, usize),
        dy: &CudaView<'_, A>,
        y: Option<&CudaView<'_, A>>,
        x: &CudaView<'_, A>,
        stats: &NormStats,
        gb: &CudaView<'_, f32>,
        dgb: &mut CudaViewMut<'_, f32>,
        dx: &mut CudaViewMut<'_, A>,
    ) -> Result<()> {
        if n == 0 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "batch norm over an empty {n}×{c} input"
            )));
        }
        need("dy", dy, n * c)?;
        need("x", x, n * c)?;
        need("dx", dx, n * c)?;
        need("stats", stats, 3 * c)?;
        need("gamma/beta", gb, 2 * c)?;
        need("dgamma/dbeta", dgb, 2 * c)?;
        self.ctx("dy", dy)?;
        self.ctx("x", x)?;
        self.ctx("dx", dx)?;
        self.ctx("stats", stats)?;
        self.ctx("gamma/beta", gb)?;
        self.ctx("dgamma/dbeta", dgb)?;
        if let Some(y) = y {
            need("y", y, n * c)?;
            self.ctx("y", y)?;
        }
        let (gamma, _) = gb.split_at(c);
        let (mut dgamma, mut dbeta) = dgb.split_at_mut(c);
        // SAFETY: every N×C buffer and the 3·C stats were checked, dγ and dβ are the halves of
        // dgb; dx is a separate mutable borrow from dy, y and x.
        unsafe {
            kernel::standardize_affine_bwd::<A>(
                &self.kernels,
                &self.stream,
                std_grid(c),
                dy,
                y,
                x,
                stats,
                &gamma,
                dx,
                &mut dgamma,
                &mut dbeta,
                n as i64,
                c as i64,
            )
        }
    }

    /// The 3×3 stride-2 padding-1 max-pool: x [n, h, w, c] → y [n, ho, wo, c], with the winning
    /// window position per output in `arg`.
    pub fn max_pool_forward<A: Act>(
        &self,
        (n, h, w, c): (usize, usize, usize, usize),
        x: &CudaView<'_, A>,
        y: &mut CudaViewMut<'_, A>,
        arg: &mut CudaViewMut<'_, u8>,
    ) -> Result<()> {
        let (ho, wo) = (pool_out(h)?, pool_out(w)?);
        check_rows(n * h * w)?;
        need("x", x, n * h * w * c)?;
        need("y", y, n * ho * wo * c)?;
        need("arg", arg, n * ho * wo * c)?;
        self.ctx("x", x)?;
        self.ctx("y", y)?;
        self.ctx("arg", arg)?;
        let [n, h, w, c, ho, wo] = [n, h, w, c, ho, wo].map(|v| v as i64);
        // SAFETY: sizes checked above, and the row count below 2³¹.
        unsafe {
            kernel::maxpool_fwd::<A>(
                &self.kernels,
                &self.stream,
                rows_grid((n * ho * wo) as usize, c as usize),
                x,
                y,
                arg,
                n,
                h,
                w,
                c,
                ho,
                wo,
            )
        }
    }

    /// Backward of [`NnOps::max_pool_forward`]: writes dx.
    pub fn max_pool_backward<A: Act>(
        &self,
        (n, h, w, c): (usize, usize, usize, usize),
        dy: &CudaView<'_, A>,
        arg: &CudaView<'_, u8>,
        dx: &mut CudaViewMut<'_, A>,
    ) -> Result<()> {
        let (ho, wo) = (pool_out(h)?, pool_out(w)?);
        check_rows(n * h * w)?;
        need("dy", dy, n * ho * wo * c)?;
        need("arg", arg, n * ho * wo * c)?;
        need("dx", dx, n * h * w * c)?;
        self.ctx("dy", dy)?;
        self.ctx("arg", arg)?;
        self.ctx("dx", dx)?;
        let [n, h, w, c, ho, wo] = [n, h, w, c, ho, wo].map(|v| v as i64);
        // SAFETY: sizes checked above, and the row count below 2³¹.
        unsafe {
            kernel::maxpool_bwd::<A>(
                &self.kernels,
                &self.stream,
                rows_grid((n * h * w) as usize, c as usize),
                dy,
                arg,
                dx,
                n,
                h,
                w,
                c,
                ho,
                wo,
            )
        }
    }

    /// Global average pool: x [n, hw, c] → y [n, c].
    pub fn avg_pool_forward<A: Act>(
        &self,
        (n, hw, c): (usize, usize, usize),
        x: &CudaView<'_, A>,
        y: &mut CudaViewMut<'_, A>,
    ) -> Result<()> {
        need("x", x, n * hw * c)?;
        need("y", y, n * c)?;
        self.ctx("x", x)?;
        self.ctx("y", y)?;
        // SAFETY: sizes checked above.
        unsafe {
            kernel::avgpool_fwd::<A>(
                &self.kernels,
                &self.stream,
                grid(n * c),
                x,
                y,
                n as i64,
                hw as i64,
                c as i64,
            )
        }
    }

    /// Backward of [`NnOps::avg_pool_forward`]: writes dx.
    pub fn avg_pool_backward<A: Act>(
        &self,
        (n, hw, c): (usize, usize, usize),
        dy: &CudaView<'_, A>,
        dx: &mut CudaViewMut<'_, A>,
    ) -> Result<()> {
        check_rows(n * hw)?;
        need("dy", dy, n * c)?;
        need("dx", dx, n * hw * c)?;
        self.ctx("dy", dy)?;
        self.ctx("dx", dx)?;
        // SAFETY: sizes checked above, and the row count below 2³¹.
        unsafe {
            kernel::avgpool_bwd::<A>(
                &self.kernels,
                &self.stream,
                rows_grid(n * hw, c),
                dy,
                dx,
                n as i64,
                hw as i64,
                c as i64,
            )
        }
    }

    fn gemm_types<A: Act>(fma_only: bool) -> cublasComputeType_t {
        if A::DTYPE == crate::cuda::Dtype::F32 && !fma_only {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        }
    }

    /// `y = x·wᵀ`: x [n, inp], w [out, inp], y [n, out]. `fma_only` keeps f32 GEMMs off TF32.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward<A: Act>(
        &mut self,
        fma_only: bool,
        (n, inp, out): (usize, usize, usize),
        x: &CudaView<'_, A>,
        w: &CudaView<'_, A>,
        y: &mut CudaViewMut<'_, A>,
    ) -> Result<()> {
        need("x", x, n * inp)?;
        need("w", w, out * inp)?;
        need("y", y, n * out)?;
        self.ctx("x", x)?;
        self.ctx("w", w)?;
        self.ctx("y", y)?;
        let s = self.stream.clone();
        self.blas.bind(&s)?;
        let (px, _g0) = x.device_ptr(&s);
        let (pw, _g1) = w.device_ptr(&s);
        let (py, _g2) = y.device_ptr_mut(&s);
        // Row-major Y = X·Wᵀ is column-major Yᵀ (out×n) = W (out×inp, stored as inp×out) · Xᵀ.
        // SAFETY: extents checked above; element types are A for all three; y is a distinct
        // mutable borrow.
        unsafe {
            self.blas.gemm_ex(
                A::CUBLAS,
                A::CUBLAS,
                Self::gemm_types::<A>(fma_only),
                (out, n, inp),
                1.0,
                Operand {
                    ptr: pw,
                    ld: inp,
                    trans: true,
                },
                Operand {
                    ptr: px,
                    ld: inp,
                    trans: false,
                },
                0.0,
                py,
                out,
            )
        }
    }

    /// Backward of [`NnOps::linear_forward`]: `dw += dyᵀ·x` into the f32 gradient, and
    /// `dx (+)= dy·w` when given (added when its flag is set).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward<A: Act>(
        &mut self,
        fma_only: bool,
        (n, inp, out): (usize, usize, usize),
        x: &CudaView<'_, A>,
        w: &CudaView<'_, A>,
        dy: &CudaView<'_, A>,
        dw: &mut CudaViewMut<'_, f32>,
        dx: Option<(&mut CudaViewMut<'_, A>, bool)>,
    ) -> Result<()> {
        need("x", x, n * inp)?;
        need("w", w, out * inp)?;
        need("dy", dy, n * out)?;
        need("dw", dw, out * inp)?;
        self.ctx("x", x)?;
        self.ctx("w", w)?;
        self.ctx("dy", dy)?;
        self.ctx("dw", dw)?;
        if let Some((dx, _)) = &dx {
            need("dx", *dx, n * inp)?;
            self.ctx("dx", *dx)?;
        }
        let s = self.stream.clone();
        self.blas.bind(&s)?;
        let compute = Self::gemm_types::<A>(fma_only);
        let (px, _g0) = x.device_ptr(&s);
        let (pw, _g1) = w.device_ptr(&s);
        let (pdy, _g2) = dy.device_ptr(&s);
        let (pdw, _g3) = dw.device_ptr_mut(&s);
        // Column-major dWᵀ (inp×out) += Xᵀ (inp×n) · dY (n×out, stored as out×n).
        // SAFETY: extents checked above; A and B of type A, C f32 (the master gradient).
        unsafe {
            self.blas.gemm_ex(
                A::CUBLAS,
                cudaDataType::CUDA_R_32F,
                compute,
                (inp, out, n),
                1.0,
                Operand {
                    ptr: px,
                    ld: inp,
                    trans: false,
                },
                Operand {
                    ptr: pdy,
                    ld: out,
                    trans: true,
                },
                1.0,
                pdw,
                inp,
            )?;
        }
        if let Some((dx, acc)) = dx {
            let (pdx, _g4) = dx.device_ptr_mut(&s);
            // Column-major dXᵀ (inp×n) = W (stored inp×out) · dYᵀ (out×n).
            // SAFETY: extents checked above; all of type A.
            unsafe {
                self.blas.gemm_ex(
                    A::CUBLAS,
                    A::CUBLAS,
                    compute,
                    (inp, n, out),
                    1.0,
                    Operand {
                        ptr: pw,
                        ld: inp,
                        trans: false,
                    },
                    Operand {
                        ptr: pdy,
                        ld: out,
                        trans: false,
                    },
                    if acc { 1.0 } else { 0.0 },
                    pdx,
                    inp,
                )?;
            }
        }
        Ok(())
    }

    /// `dst = bf16(src)`.
    pub fn cast_f32_bf16(
        &self,
        src: &CudaView<'_, f32>,
        dst: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        need("dst", dst, src.len())?;
        self.ctx("src", src)?;
        self.ctx("dst", dst)?;
        let n = src.len();
        // SAFETY: dst holds at least src.len() elements (checked above).
        unsafe { kernel::cast_f32_bf16(&self.kernels, &self.stream, grid(n), src, dst, n as i64) }
    }

    /// `dst += src`: a weight gradient of one view into the f32 master gradient.
    pub fn accumulate_into_f32<A: Act>(
        &self,
        src: &CudaView<'_, A>,
        dst: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        need("dst", dst, src.len())?;
        self.ctx("src", src)?;
        self.ctx("dst", dst)?;
        let n = src.len();
        // SAFETY: dst holds at least src.len() elements (checked above).
        unsafe { kernel::accumulate::<A>(&self.kernels, &self.stream, grid(n), src, dst, n as i64) }
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }
}

fn pool_out(h: usize) -> Result<usize> {
    if h == 0 {
        return Err(Error::InvalidConfig("max-pool over an empty image".into()));
    }
    Ok((h + 2 - 3) / 2 + 1)
}

/// The LARS tables of a flat parameter array: every tensor split into chunks of at most
/// [`LARS_CHUNK`] elements.
pub struct LarsTables {
    chunk_start: CudaSlice<i64>,
    chunk_len: CudaSlice<i32>,
    chunk_tensor: CudaSlice<i32>,
    tensor_vector: CudaSlice<i32>,
    first_chunk: CudaSlice<i32>,
    n_chunks: CudaSlice<i32>,
    partial: CudaSlice<f32>,
    trust: CudaSlice<f32>,
    chunks: usize,
    tensors: usize,
    total: usize,
}

/// LARS hyper-parameters of one step.
#[derive(Debug, Clone, Copy)]
pub struct LarsStep {
    /// Weight decay added to the gradient of weights (not of one-dimensional parameters).
    pub weight_decay: f32,
    /// Trust coefficient η.
    pub eta: f32,
    /// Momentum coefficient m.
    pub momentum: f32,
    /// Learning rate of weights at this step.
    pub lr_weights: f32,
    /// Learning rate of one-dimensional parameters (biases, norm weights) at this step.
    pub lr_biases: f32,
}

impl LarsTables {
    /// Tables for tensors given as (offset, length, is 1-D) over a flat array; tensors must be
    /// disjoint and inside `0..total`.
    pub fn new(
        stream: &Arc<CudaStream>,
        tensors: &[(usize, usize, bool)],
        total: usize,
    ) -> Result<Self> {
        let (mut cs, mut cl, mut ct) = (Vec::new(), Vec::new(), Vec::new());
        let (mut tv, mut fc, mut nc) = (Vec::new(), Vec::new(), Vec::new());
        for (t, &(off, len, vector)) in tensors.iter().enumerate() {
            if off + len > total || len == 0 {
                return Err(Error::InvalidConfig(format!(
                    "parameter tensor {t} ({off}..{}) lies outside the {total} parameters",
                    off + len
                )));
            }
            fc.push(cs.len() as i32);
            let mut k = 0;
            while k < len {
                let l = LARS_CHUNK.min(len - k);
                cs.push((off + k) as i64);
                cl.push(l as i32);
                ct.push(t as i32);
                k += l;
            }
            nc.push(cs.len() as i32 - fc[t]);
            tv.push(i32::from(vector));
        }
        let up = |v: &[i32]| {
            stream
                .clone_htod(v)
                .map_err(drv("uploading the LARS tables"))
        };
        Ok(Self {
            chunk_start: stream
                .clone_htod(&cs)
                .map_err(drv("uploading the LARS tables"))?,
            chunk_len: up(&cl)?,
            chunk_tensor: up(&ct)?,
            tensor_vector: up(&tv)?,
            first_chunk: up(&fc)?,
            n_chunks: up(&nc)?,
            partial: alloc(stream, 2 * cs.len(), "allocating LARS scratch")?,
            trust: alloc(stream, tensors.len(), "allocating LARS scratch")?,
            chunks: cs.len(),
            tensors: tensors.len(),
            total,
        })
    }

    /// One LARS step over the flat arrays, in three launches; refreshes `work`, the copy of the
    /// parameters in the element type the layers read.
    pub fn step<A: Act>(
        &mut self,
        ops: &NnOps,
        hp: LarsStep,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        mom: &mut CudaSlice<f32>,
        work: &mut CudaSlice<A>,
    ) -> Result<()> {
        for (name, len) in [("parameters", w.len()), ("gradients", g.len())] {
            if len < self.total {
                return Err(Error::BufferTooSmall {
                    name: if name == "parameters" {
                        "parameters"
                    } else {
                        "gradients"
                    },
                    len,
                    needed: self.total,
                });
            }
        }
        need("momentum", mom, self.total)?;
        need("working weights", work, self.total)?;
        let s = ops.stream().clone();
        check_context("parameters", w, &s)?;
        check_context("gradients", g, &s)?;
        check_context("momentum", mom, &s)?;
        check_context("working weights", work, &s)?;
        if self.chunks == 0 {
            return Ok(());
        }
        let k = ops.kernels();
        let per_chunk = LaunchConfig {
            grid_dim: (self.chunks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every chunk lies inside 0..total (checked in `new`) and w, g hold `total`
        // floats; the partial array 2·chunks floats; one block per chunk.
        unsafe {
            kernel::lars_partial(
                k,
                &s,
                per_chunk,
                w,
                g,
                &self.chunk_start,
                &self.chunk_len,
                &self.chunk_tensor,
                &self.tensor_vector,
                hp.weight_decay,
                &mut self.partial,
            )?;
        }
        // SAFETY: one thread per tensor; its chunks index the partial array of 2·chunks floats,
        // and trust holds one float per tensor.
        unsafe {
            kernel::lars_trust(
                k,
                &s,
                grid(self.tensors),
                &self.partial,
                &self.first_chunk,
                &self.n_chunks,
                &self.tensor_vector,
                self.tensors as i64,
                hp.eta,
                &mut self.trust,
            )?;
        }
        // SAFETY: as lars_partial; momentum and the working copy hold `total` elements.
        unsafe {
            kernel::lars_update::<A>(
                k,
                &s,
                per_chunk,
                w,
                g,
                mom,
                &self.chunk_start,
                &self.chunk_len,
                &self.chunk_tensor,
                &self.tensor_vector,
                &self.trust,
                hp.weight_decay,
                hp.lr_weights,
                hp.lr_biases,
                hp.momentum,
                work,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_chunks_cover_every_row_once() {
        for &(m, c) in &[
            (1, 1),
            (2, 3),
            (63, 64),
            (65, 64),
            (256 * 112 * 112, 64),
            (12544, 2048),
            (256, 8192),
            (7, 100_000),
        ] {
            let (rows, chunks) = norm_chunks(m, c);
            assert!(rows >= 1 && chunks >= 1);
            // The kernels give chunk k rows k·rows .. min(m, (k+1)·rows).
            assert!(chunks * rows >= m, "{m}x{c}: rows not covered");
            assert!((chunks - 1) * rows < m, "{m}x{c}: an empty chunk");
            assert!(chunks <= REDUCE_BLOCKS.max(1));
            assert!(chunks <= 65_535, "grid y limit");
        }
    }
}

#[cfg(test)]
mod grid_tests {
    use super::*;

    #[test]
    fn row_kernels_cover_channels_with_whole_warps() {
        for &(rows, c, bx, by) in &[
            (100, 64, 64, 4),
            (7, 3, 32, 8),
            (1 << 22, 2048, 256, 1),
            (5, 100, 128, 2),
        ] {
            let g = rows_grid(rows, c);
            assert_eq!(g.block_dim, (bx, by, 1), "{rows}x{c}");
            assert_eq!(g.block_dim.0 * g.block_dim.1, THREADS);
            assert!(g.grid_dim.0 >= 1 && g.grid_dim.0 <= 1 << 16);
        }
        assert!(check_rows(1 << 31).is_err() && check_rows((1 << 31) - 1).is_ok());
    }
}
