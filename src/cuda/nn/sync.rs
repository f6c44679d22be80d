//! Batch norm synchronized across the ranks of an NCCL group (data-parallel training): the
//! statistics of every rank's rows, as the reference recipe's synchronized batch norm has them.
//! Forward: Σx, all-reduce, Σ(x − mean)², all-reduce (f64, C each), then the usual affine pass.
//! Backward: Σg and Σg·x̂ of this rank's rows go into dγ, dβ (summed over the ranks with the other
//! gradients), and, all-reduced, into the input gradient. The CPU twin is
//! `crate::train::parallel::SyncBackend`.

use super::{kernel, rows_grid, NnOps, NormBackward, NormForward, COLS, ROWS, THREADS};
use crate::cuda::nccl::Nccl;
use crate::cuda::{alloc, Act};
use crate::error::Result;
use cudarc::driver::LaunchConfig;

fn col_grid(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(COLS) as u32, 1, 1),
        block_dim: (COLS as u32, ROWS, 1),
        shared_mem_bytes: 0,
    }
}

fn small(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl NnOps {
    /// [`NnOps::batch_norm_forward`] in training mode with the statistics of every rank's rows
    /// (each rank `args.rows` of them); the running statistics move by `momentum`, unbiased by
    /// the whole batch.
    pub fn batch_norm_forward_sync<A: Act>(
        &mut self,
        comm: &Nccl,
        momentum: f32,
        args: NormForward<'_, A>,
    ) -> Result<()> {
        self.check_forward(&args)?;
        let NormForward {
            rows: m,
            c,
            eps,
            relu,
            x,
            gb,
            mut running,
            residual,
            mut y,
            stats,
        } = args;
        let s = self.stream.clone();
        let total = m * comm.world_size();
        let (m64, c64, t64) = (m as i64, c as i64, total as i64);
        let what = "allocating batch-norm sums";
        let mut sums = alloc::<f64>(&s, c, what)?;
        let mut sq = alloc::<f64>(&s, c, what)?;
        // SAFETY: x holds m×c elements and sums c doubles (checked above); the kernel touches
        // rows < m and channels < c only.
        unsafe {
            kernel::bn_sync_sums::<A>(&self.kernels, &s, col_grid(c), &x, &mut sums, m64, c64)?
        };
        comm.ordered(&s, |c| c.all_reduce_sum_f64(&mut sums))?;
        let inv = 1.0 / total as f64;
        // SAFETY: as above; sq holds c doubles.
        unsafe {
            kernel::bn_sync_centered::<A>(
                &self.kernels,
                &s,
                col_grid(c),
                &x,
                &sums,
                inv,
                &mut sq,
                m64,
                c64,
            )?
        };
        comm.ordered(&s, |c| c.all_reduce_sum_f64(&mut sq))?;
        let (mut mean, mut rstd) = stats.split_at_mut(c);
        let (mut running_mean, mut running_var) = running.split_at_mut(c);
        // SAFETY: every argument holds c values (the halves of 2·c buffers); one thread per
        // channel.
        unsafe {
            kernel::bn_sync_stats(
                &self.kernels,
                &s,
                small(c),
                &sums,
                &sq,
                t64,
                c64,
                eps,
                momentum,
                &mut mean,
                &mut rstd,
                &mut running_mean,
                &mut running_var,
            )?
        };
        let (gamma, beta) = gb.split_at(c);
        // SAFETY: x, y and the residual (if any) hold m×c elements, the per-channel arrays c
        // floats; y is a distinct mutable borrow.
        unsafe {
            kernel::bn_apply::<A>(
                &self.kernels,
                &s,
                rows_grid(m, c),
                &x,
                &mean,
                &rstd,
                &gamma,
                &beta,
                residual.as_ref(),
                &mut y,
                m64,
                c64,
                i32::from(relu),
            )
        }
    }

    /// Backward of [`NnOps::batch_norm_forward_sync`]: dγ, dβ accumulate this rank's sums, dx
    /// uses every rank's.
    pub fn batch_norm_backward_sync<A: Act>(
        &mut self,
        comm: &Nccl,
        args: NormBackward<'_, A>,
    ) -> Result<()> {
        self.check_backward(&args, 2 * args.c)?;
        let NormBackward {
            rows: m,
            c,
            dy,
            y,
            x,
            stats,
            gb,
            mut dgb,
            mut dx,
            dres,
        } = args;
        let s = self.stream.clone();
        let total = m * comm.world_size();
        let (m64, c64) = (m as i64, c as i64);
        let mut sums = alloc::<f64>(&s, 2 * c, "allocating batch-norm sums")?;
        let (mean, rstd) = stats.split_at(c);
        // SAFETY: dy, y (if any) and x hold m×c elements, mean and rstd c floats, sums 2·c
        // doubles.
        unsafe {
            kernel::bn_bwd_sums::<A>(
                &self.kernels,
                &s,
                col_grid(c),
                &dy,
                y.as_ref(),
                &x,
                &mean,
                &rstd,
                &mut sums,
                m64,
                c64,
            )?
        };
        let (mut dgamma, mut dbeta) = dgb.split_at_mut(c);
        // SAFETY: sums holds 2·c doubles, dγ and dβ c floats each; one thread per channel.
        unsafe {
            kernel::bn_sync_params(
                &self.kernels,
                &s,
                small(c),
                &sums,
                c64,
                &mut dgamma,
                &mut dbeta,
            )?
        };
        comm.ordered(&s, |c| c.all_reduce_sum_f64(&mut sums))?;
        let coef = Self::scratch(&mut self.coef, &s, 2 * c)?;
        // SAFETY: sums holds 2·c doubles, coef at least 2·c floats.
        unsafe {
            kernel::bn_sync_coef(&self.kernels, &s, small(c), &sums, total as i64, c64, coef)?
        };
        let (gamma, _) = gb.split_at(c);
        let (dres, accum) = match dres {
            Some((r, acc)) => (Some(r), i32::from(acc)),
            None => (None, 0),
        };
        let mut dres = dres;
        // SAFETY: every m×c buffer was checked; dx and dres are distinct mutable borrows from
        // each other and from dy, y and x.
        unsafe {
            kernel::bn_bwd_apply::<A>(
                &self.kernels,
                &s,
                rows_grid(m, c),
                &dy,
                y.as_ref(),
                &x,
                &mean,
                &rstd,
                &gamma,
                coef,
                &mut dx,
                dres.as_mut(),
                accum,
                m64,
                c64,
            )
        }
    }
}
