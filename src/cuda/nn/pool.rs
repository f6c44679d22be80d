//! Max-pool (the ImageNet stem's) and the global average pool, NHWC.

use super::{check_rows, grid, kernel, need, rows_grid, NnOps};
use crate::cuda::Act;
use crate::error::{Error, Result};
use cudarc::driver::{CudaView, CudaViewMut};

impl NnOps {
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
}

fn pool_out(h: usize) -> Result<usize> {
    if h == 0 {
        return Err(Error::InvalidConfig("max-pool over an empty image".into()));
    }
    Ok((h + 2 - 3) / 2 + 1)
}
