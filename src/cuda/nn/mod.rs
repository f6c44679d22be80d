//! Safe wrappers over the trainer's kernels (batch norm, pooling, conversions, LARS) and its
//! linear layers (cuBLAS), one method per operation. Activations are NHWC: an image batch is an
//! M×C row-major matrix with M = N·H·W, which is also how the projector's N×C features look, so
//! one set of batch-norm kernels serves both.
//!
//! Every method checks its buffers' lengths and contexts, then queues work on the stream without
//! waiting. The CPU twins are the layers of [`crate::nn`] (NCHW); the tests compare the two.

mod convert;
mod lars;
mod linear;
mod norm;
mod pool;
mod sync;

pub use lars::{LarsStep, LarsTables};
pub use norm::{NormBackward, NormForward};

use super::blas::Blas;
use super::fatbin::TRAIN;
use super::module::{kernels, Kernels};
use super::{alloc, check_available, check_context};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceSlice, LaunchConfig};
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
        /// Σx per channel in f64, for a batch norm synchronized across ranks.
        fn bn_sync_sums<A: Act>(x: &A, out: &mut f64, m: i64, c: i64)
            = act(A::DTYPE, "bn_sync_sums_f32", "bn_sync_sums_bf16");
        /// Σ(x − mean)² per channel in f64, the mean from every rank's sums.
        fn bn_sync_centered<A: Act>(
            x: &A, sums: &f64, inv_count: f64, out: &mut f64, m: i64, c: i64,
        ) = act(A::DTYPE, "bn_sync_centered_f32", "bn_sync_centered_bf16");
        /// Mean, rstd and the running statistics from every rank's sums.
        fn bn_sync_stats(
            sums: &f64, sq: &f64, m: i64, c: i64, eps: f32, momentum: f32, mean: &mut f32,
            rstd: &mut f32, running_mean: &mut f32, running_var: &mut f32,
        ) = "bn_sync_stats";
        /// Σg and Σg·x̂ per channel of this rank's rows, in f64.
        fn bn_bwd_sums<A: Act>(
            dy: &A, y: Option<&A>, x: &A, mean: &f32, rstd: &f32, out: &mut f64, m: i64, c: i64,
        ) = act(A::DTYPE, "bn_bwd_sums_f32", "bn_bwd_sums_bf16");
        /// dγ, dβ from this rank's sums.
        fn bn_sync_params(sums: &f64, c: i64, dgamma: &mut f32, dbeta: &mut f32)
            = "bn_sync_params";
        /// The input gradient's coefficients from every rank's sums.
        fn bn_sync_coef(sums: &f64, m: i64, c: i64, coef: &mut f32) = "bn_sync_coef";
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
