//! The projector's linear layers, through cuBLAS.

use super::{need, NnOps};
use crate::cuda::blas::Operand;
use crate::cuda::Act;
use crate::error::Result;
use cudarc::cublas::sys::{cublasComputeType_t, cudaDataType};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

impl NnOps {
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
}
