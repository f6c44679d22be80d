//! Batch norm over M×C activations (the backbone's, through the batch-norm kernels) and the
//! projector's norm over N×C features (through the loss's standardization kernels).

use super::{
    kernel, need, norm_chunks, rows_grid, std_grid, NnOps, NormMode, NormStats, COLS, ROWS, THREADS,
};
use crate::cuda::Act;
use crate::error::{Error, Result};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

/// The tensors of one norm's forward over `rows`×`c` values: input `x`, output `y`, `gb` =
/// [γ | β], `running` = [mean | var] (moved in training), `residual` (added before the ReLU),
/// and `stats`, which receives what the backward needs.
pub struct NormForward<'a, A: Act> {
    /// Rows (N·H·W positions, or N samples).
    pub rows: usize,
    /// Channels.
    pub c: usize,
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Whether a ReLU follows.
    pub relu: bool,
    /// Input, rows×c.
    pub x: CudaView<'a, A>,
    /// [γ | β].
    pub gb: CudaView<'a, f32>,
    /// [running mean | running var].
    pub running: CudaViewMut<'a, f32>,
    /// The shortcut added after normalizing, rows×c.
    pub residual: Option<CudaView<'a, A>>,
    /// Output, rows×c.
    pub y: CudaViewMut<'a, A>,
    /// Statistics for the backward.
    pub stats: &'a mut NormStats,
}

/// The tensors of one norm's backward: `dgb` ([dγ | dβ]) accumulates, `dx` is written, and the
/// residual's gradient `dres` is written or, when its flag is set, added to. `y` is the
/// forward's output, given when the norm had a ReLU (its sign masks dy).
pub struct NormBackward<'a, A: Act> {
    /// Rows.
    pub rows: usize,
    /// Channels.
    pub c: usize,
    /// Gradient of the output.
    pub dy: CudaView<'a, A>,
    /// The forward's output, when a ReLU followed.
    pub y: Option<CudaView<'a, A>>,
    /// The forward's input.
    pub x: CudaView<'a, A>,
    /// The forward's statistics.
    pub stats: &'a NormStats,
    /// [γ | β].
    pub gb: CudaView<'a, f32>,
    /// [dγ | dβ], accumulated.
    pub dgb: CudaViewMut<'a, f32>,
    /// Gradient of the input, written.
    pub dx: CudaViewMut<'a, A>,
    /// Gradient of the residual, and whether to add to it.
    pub dres: Option<(CudaViewMut<'a, A>, bool)>,
}

impl NnOps {
    /// The checks every batch-norm forward makes first: a non-empty input, a usable eps, and
    /// every buffer long enough and in this context.
    pub(super) fn check_forward<A: Act>(&self, a: &NormForward<'_, A>) -> Result<()> {
        let (m, c) = (a.rows, a.c);
        if m == 0 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "batch norm over an empty {m}×{c} input"
            )));
        }
        if !(a.eps > 0.0 && a.eps.is_finite()) {
            return Err(Error::InvalidConfig(format!("batch norm eps = {}", a.eps)));
        }
        need("x", &a.x, m * c)?;
        need("y", &a.y, m * c)?;
        need("gamma/beta", &a.gb, 2 * c)?;
        need("running statistics", &a.running, 2 * c)?;
        need("stats", &*a.stats, 2 * c)?;
        if let Some(r) = &a.residual {
            need("residual", r, m * c)?;
            self.ctx("residual", r)?;
        }
        self.ctx("x", &a.x)?;
        self.ctx("y", &a.y)?;
        self.ctx("gamma/beta", &a.gb)?;
        self.ctx("running statistics", &a.running)?;
        self.ctx("stats", &*a.stats)
    }

    /// The checks every batch-norm backward makes first, with `stats` floats of statistics.
    pub(super) fn check_backward<A: Act>(
        &self,
        a: &NormBackward<'_, A>,
        stats: usize,
    ) -> Result<()> {
        let (m, c) = (a.rows, a.c);
        if m == 0 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "batch norm over an empty {m}×{c} input"
            )));
        }
        need("dy", &a.dy, m * c)?;
        need("x", &a.x, m * c)?;
        need("dx", &a.dx, m * c)?;
        need("stats", a.stats, stats)?;
        need("gamma/beta", &a.gb, 2 * c)?;
        need("dgamma/dbeta", &a.dgb, 2 * c)?;
        self.ctx("dy", &a.dy)?;
        self.ctx("x", &a.x)?;
        self.ctx("dx", &a.dx)?;
        self.ctx("stats", a.stats)?;
        self.ctx("gamma/beta", &a.gb)?;
        self.ctx("dgamma/dbeta", &a.dgb)?;
        if let Some(y) = &a.y {
            need("y", y, m * c)?;
            self.ctx("y", y)?;
        }
        if let Some((r, _)) = &a.dres {
            need("dres", r, m * c)?;
            self.ctx("dres", r)?;
        }
        Ok(())
    }

    /// Batch norm over the M rows of x (M×C): `y = act(x̂·γ + β (+ residual))` with ReLU when
    /// `relu`. `gb` holds [γ | β], `running` [mean | var] (updated in training), `stats` receives
    /// [mean | rstd] for the backward pass.
    pub fn batch_norm_forward<A: Act>(
        &mut self,
        mode: NormMode,
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
        let (x, gb, running, y) = (&x, &gb, &mut running, &mut y);
        let residual = residual.as_ref();
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
                // are C-float halves of their 2·C buffers; merge_grid gives the kernel its
                // 256-thread blocks of 32 threads per channel, covering every channel.
                unsafe {
                    kernel::bn_stats_final::<A>(
                        &self.kernels,
                        &s,
                        merge_grid(c),
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
    pub fn batch_norm_backward<A: Act>(&mut self, args: NormBackward<'_, A>) -> Result<()> {
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
            mut dres,
        } = args;
        let (dy, y, x, gb, dgb, dx) = (&dy, y.as_ref(), &x, &gb, &mut dgb, &mut dx);
        let dres = dres.as_mut().map(|(d, acc)| (d, *acc));
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
        // SAFETY: dγ and dβ are the two C-float halves of dgb, coef holds 2·C floats; merge_grid
        // gives the kernel its 256-thread blocks of 32 threads per channel, covering every channel.
        unsafe {
            kernel::bn_bwd_final(
                &self.kernels,
                &s,
                merge_grid(c),
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
    pub fn standardize_affine_forward<A: Act>(
        &self,
        momentum: f32,
        args: NormForward<'_, A>,
    ) -> Result<()> {
        let NormForward {
            rows: n,
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
        if residual.is_some() {
            return Err(Error::InvalidConfig(
                "the projector's norm takes no residual".into(),
            ));
        }
        let (x, gb, running, y) = (&x, &gb, &mut running, &mut y);
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
    pub fn standardize_affine_backward<A: Act>(&self, args: NormBackward<'_, A>) -> Result<()> {
        if args.dres.is_some() {
            return Err(Error::InvalidConfig(
                "the projector's norm has no residual gradient".into(),
            ));
        }
        self.check_backward(&args, 3 * args.c)?;
        let NormBackward {
            rows: n,
            c,
            dy,
            y,
            x,
            stats,
            gb,
            mut dgb,
            mut dx,
            dres: _,
        } = args;
        let (dy, y, x, gb, dgb, dx) = (&dy, y.as_ref(), &x, &gb, &mut dgb, &mut dx);
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
}

/// The final merges' launch (`bn_stats_final`, `bn_bwd_final` in batchnorm.cu): blocks of
/// MERGE_THREADS = 256 threads, MERGE_LANES = 32 to a channel, so 8 channels a block.
fn merge_grid(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
