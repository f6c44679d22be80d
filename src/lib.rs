//! # barlow
//!
//! Fast Barlow Twins: the loss (batch standardization, cross-correlation, the diagonal and
//! off-diagonal reduction, and the whole backward pass) as fused CUDA kernels plus cuBLAS, with a
//! CPU twin of every kernel and a float64 reference that the tests hold both to.
//!
//! * [`BarlowTwinsLoss`] — the loss and its gradients, on host slices or CUDA device buffers.
//! * [`cpu`] — the CPU kernels and the [`cpu::reference`] implementation.
//! * [`cuda`] — the embedded kernels, [`cuda::ops::CudaOps`] (one safe method per kernel and GEMM),
//!   and [`cuda::naive::NaiveLoss`], the op-by-op baseline used by the benchmarks.
//!
//! CUDA is loaded at run time: a binary built with the kernels runs on machines without a GPU, and
//! every CUDA entry point then returns an [`Error`] saying what is missing.

pub mod bench;
pub mod cpu;
pub mod cuda;
mod error;
pub mod io;
mod loss;
pub mod nn;
pub mod rng;
mod shape;
pub mod train;

pub use error::{Error, Result};
pub use loss::{BarlowTwinsLoss, LossConfig, LossValue, Math, Path};
pub use shape::Dims;

/// Whether this build embeds the CUDA kernels (it was compiled with nvcc available).
pub fn built_with_kernels() -> bool {
    cuda::fatbin::FATBIN.is_some()
}
