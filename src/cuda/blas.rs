//! cuBLAS through cudarc: one handle per workspace, GemmEx with the precision the loss asks for.

use super::{check_cublas, check_i32};
use crate::error::{Error, Result};
use crate::Math;
use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaStream;
use std::sync::Arc;

pub(crate) fn blas_err(during: &'static str) -> impl Fn(CublasError) -> Error {
    move |e| match e.0 {
        cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => {
            Error::OutOfDeviceMemory {
                during: during.to_string(),
                bytes: 0,
            }
        }
        _ => Error::Cublas {
            during: during.to_string(),
            message: format!("{e:?}"),
        },
    }
}

fn bind_context(stream: &CudaStream) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(super::drv("making the stream's context current"))
}

/// One cuBLAS handle, bound to the stream it last ran on.
pub(crate) struct Blas {
    inner: CudaBlas,
    stream: Arc<CudaStream>,
}

/// A column-major GEMM operand: device pointer, leading dimension, transposed or not.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub trans: bool,
}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        check_cublas()?;
        let inner = CudaBlas::new(stream.clone()).map_err(blas_err("creating a cuBLAS handle"))?;
        Ok(Self {
            inner,
            stream: stream.clone(),
        })
    }

    /// Routes later GEMMs to `stream` (a no-op when it is already bound).
    pub(crate) fn bind(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        bind_context(stream)?;
        if self.stream.cu_stream() != stream.cu_stream() {
            // SAFETY: all of this handle's work is queued in stream order by the caller; switching
            // the stream only changes where later GEMMs go.
            unsafe { self.inner.set_stream(stream.clone()) }
                .map_err(blas_err("binding cuBLAS to a stream"))?;
            self.stream = stream.clone();
        }
        Ok(())
    }

    /// Column-major `C (m×n, f32) = alpha · op(A) · op(B) + beta · C`; A and B are f32, or bf16
    /// under [`Math::Bf16`].
    ///
    /// # Safety
    /// The pointers must be live device allocations in the handle's context holding the extents
    /// that m, n, k and the leading dimensions describe, with element type f32 (bf16 for A and B
    /// under `Math::Bf16`), and `c` must not overlap `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm(
        &self,
        math: Math,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: u64,
        ldc: usize,
    ) -> Result<()> {
        let (ab_type, compute) = match math {
            Math::F32 => (
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            Math::Tf32 => (
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            Math::Bf16 => (
                cudaDataType::CUDA_R_16BF,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        self.gemm_ex(
            ab_type,
            cudaDataType::CUDA_R_32F,
            compute,
            (m, n, k),
            alpha,
            a,
            b,
            beta,
            c,
            ldc,
        )
    }

    /// Column-major `C = alpha · op(A) · op(B) + beta · C` with A and B of type `ab_type`, C of
    /// type `c_type`, accumulated in f32 (`compute`).
    ///
    /// # Safety
    /// As [`Blas::gemm`], with the element types given here.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_ex(
        &self,
        ab_type: cudaDataType,
        c_type: cudaDataType,
        compute: cublasComputeType_t,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: u64,
        ldc: usize,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // The raw cuBLAS call does not make the handle's context current; a kernel launch would.
        bind_context(&self.stream)?;
        cudarc::cublas::result::gemm_ex(
            *self.inner.handle(),
            op(a.trans),
            op(b.trans),
            check_i32("GEMM m", m)?,
            check_i32("GEMM n", n)?,
            check_i32("GEMM k", k)?,
            (&alpha) as *const f32 as *const _,
            a.ptr as *const _,
            ab_type,
            check_i32("GEMM lda", a.ld)?,
            b.ptr as *const _,
            ab_type,
            check_i32("GEMM ldb", b.ld)?,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            c_type,
            check_i32("GEMM ldc", ldc)?,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(blas_err("cublasGemmEx"))
    }
}
