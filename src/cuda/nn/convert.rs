//! Element conversions: the bf16 working copy, and weight gradients into the f32 master.

use super::{grid, kernel, need, NnOps};
use crate::cuda::module::Kernels;
use crate::cuda::Act;
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut};
use half::bf16;

impl NnOps {
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
