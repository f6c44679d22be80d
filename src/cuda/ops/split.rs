//! The standardization of a batch split across ranks (kernels/loss/standardize_split.cu): each
//! stage leaves per-column f64 sums that the caller adds up over the ranks before the next. The CPU
//! twins are `crate::cpu::{column_sums, centered_squares, write_stats, apply_standardize,
//! grad_sums, apply_standardize_backward}`.

use super::{check_eps, check_math, kernel, rows_checked, std_launch, CudaOps};
use crate::cpu::STATS_PER_COLUMN;
use crate::cuda::{Element, HatElement};
use crate::error::{Error, Result};
use crate::shape::{check_input, check_output, Dims};
use crate::Math;
use cudarc::driver::{DevicePtr, DevicePtrMut};

fn count(total: usize) -> Result<f64> {
    if total < 2 {
        return Err(Error::BatchTooSmall { n: total });
    }
    Ok(1.0 / total as f64)
}

impl CudaOps {
    /// Σ z per column of this rank's rows into `out` (D f64).
    pub(crate) fn column_sums<T: Element>(
        &self,
        z: &impl DevicePtr<T>,
        dims: Dims,
        out: &mut impl DevicePtrMut<f64>,
    ) -> Result<()> {
        let (n, d) = rows_checked(dims)?;
        check_input("z", z.len(), dims)?;
        check_output("column sums", out.len(), d)?;
        // SAFETY: z holds n×d elements and out d (checked above); the kernel touches rows < n and
        // columns < d only.
        unsafe {
            kernel::column_sums::<T>(
                &self.kernels,
                &self.stream,
                std_launch(d)?,
                z,
                out,
                n as i64,
                d as i64,
            )
        }
    }

    /// Σ (z − mean)² per column of this rank's rows, the mean being `sums` (every rank's column
    /// sums, added up) over `total` rows.
    pub(crate) fn centered_squares<T: Element>(
        &self,
        z: &impl DevicePtr<T>,
        dims: Dims,
        sums: &impl DevicePtr<f64>,
        total: usize,
        out: &mut impl DevicePtrMut<f64>,
    ) -> Result<()> {
        let (n, d) = rows_checked(dims)?;
        let inv = count(total)?;
        check_input("z", z.len(), dims)?;
        check_output("column sums", sums.len(), d)?;
        check_output("centered squares", out.len(), d)?;
        // SAFETY: z holds n×d elements, sums and out d each (checked above).
        unsafe {
            kernel::centered_squares::<T>(
                &self.kernels,
                &self.stream,
                std_launch(d)?,
                z,
                sums,
                inv,
                out,
                n as i64,
                d as i64,
            )
        }
    }

    /// The statistics of the whole batch (`sums` and `sq` added up over the ranks, `total` rows)
    /// into `stats` (3·D, as [`CudaOps::standardize_forward`] writes them), and this rank's Ẑ.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn standardize_apply<T: Element, O: HatElement>(
        &self,
        math: Math,
        z: &impl DevicePtr<T>,
        dims: Dims,
        (sums, sq, total): (&impl DevicePtr<f64>, &impl DevicePtr<f64>, usize),
        eps: f32,
        stats: &mut impl DevicePtrMut<f32>,
        zhat: &mut impl DevicePtrMut<O>,
    ) -> Result<()> {
        let (n, d) = rows_checked(dims)?;
        let inv = count(total)?;
        check_eps(eps)?;
        check_math::<O>(math)?;
        check_input("z", z.len(), dims)?;
        check_output("column sums", sums.len(), d)?;
        check_output("centered squares", sq.len(), d)?;
        check_output("stats", stats.len(), STATS_PER_COLUMN * d)?;
        check_output("zhat", zhat.len(), n * d)?;
        let tf32 = i32::from(math == Math::Tf32);
        // SAFETY: z and zhat hold n×d elements, sums and sq d, stats 3·d (checked above).
        unsafe {
            kernel::standardize_apply::<T, O>(
                &self.kernels,
                &self.stream,
                std_launch(d)?,
                z,
                sums,
                sq,
                inv,
                eps,
                stats,
                zhat,
                n as i64,
                d as i64,
                tf32,
            )
        }
    }

    /// Σ g and Σ g·x̂ per column of this rank's rows into `out` ([Σ g | Σ g·x̂], 2·D f64).
    pub(crate) fn std_bwd_sums<T: Element>(
        &self,
        g: &impl DevicePtr<f32>,
        z: &impl DevicePtr<T>,
        stats: &impl DevicePtr<f32>,
        dims: Dims,
        out: &mut impl DevicePtrMut<f64>,
    ) -> Result<()> {
        let (n, d) = rows_checked(dims)?;
        check_output("g", g.len(), n * d)?;
        check_input("z", z.len(), dims)?;
        check_output("stats", stats.len(), STATS_PER_COLUMN * d)?;
        check_output("gradient sums", out.len(), 2 * d)?;
        // SAFETY: g and z hold n×d elements, stats 3·d, out 2·d (checked above).
        unsafe {
            kernel::std_bwd_sums::<T>(
                &self.kernels,
                &self.stream,
                std_launch(d)?,
                g,
                z,
                stats,
                out,
                n as i64,
                d as i64,
            )
        }
    }

    /// dz of this rank's rows from the whole batch's [Σ g | Σ g·x̂] (`sums`, `total` rows).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn std_bwd_apply<T: Element>(
        &self,
        g: &impl DevicePtr<f32>,
        z: &impl DevicePtr<T>,
        stats: &impl DevicePtr<f32>,
        sums: &impl DevicePtr<f64>,
        total: usize,
        dims: Dims,
        dz: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let (n, d) = rows_checked(dims)?;
        let inv = count(total)?;
        check_output("g", g.len(), n * d)?;
        check_input("z", z.len(), dims)?;
        check_output("stats", stats.len(), STATS_PER_COLUMN * d)?;
        check_output("gradient sums", sums.len(), 2 * d)?;
        check_output("dz", dz.len(), n * d)?;
        // SAFETY: g, z and dz hold n×d elements, stats 3·d, sums 2·d (checked above); dz is a
        // distinct mutable borrow.
        unsafe {
            kernel::std_bwd_apply::<T>(
                &self.kernels,
                &self.stream,
                std_launch(d)?,
                g,
                z,
                stats,
                sums,
                inv,
                dz,
                n as i64,
                d as i64,
            )
        }
    }
}
