//! # barlow
//!
//! Fast Barlow Twins: the loss (batch standardization, cross-correlation, the diagonal and
//! off-diagonal reduction, and the whole backward pass) as fused CUDA kernels plus cuBLAS, with a
//! CPU twin of every kernel and a float64 reference that the tests hold both to.
//!
//! * [`BarlowTwinsLoss`] — the loss and its gradients, on host slices or (feature `cuda`) CUDA
//!   device buffers, waiting for the result or writing it to device memory.
//! * [`cpu`] — the CPU kernels and the [`cpu::reference`] implementation.
//! * [`collective`] — collectives between the ranks of a data-parallel group; the loss over a
//!   batch split across ranks ([`BarlowTwinsLoss::forward_backward_cpu_across`]).
//! * `cuda` (feature `cuda`) — the embedded kernels, `cuda::ops::CudaOps` (one safe method per
//!   kernel and GEMM); `cuda::naive::NaiveLoss` (feature `bench`) is the op-by-op baseline.
//! * `candle` (feature `candle`) — the loss as a candle custom op with gradients (CPU tensors;
//!   CUDA tensors with `candle-cuda`).
//! * `nn`, `train` (feature `train`) — the ResNet model and its CPU and CUDA training engines.
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | *(none)* | the CPU loss, its f64 reference, configuration and errors |
//! | `cuda` | the CUDA loss and its kernels (cudarc; the application picks cudarc's linking mode and CUDA version) |
//! | `nccl` | NCCL communicators for several GPUs (`cuda::nccl`) |
//! | `bench` | the op-by-op baseline loss and the benchmark harness |
//! | `train` | the model, both training engines, data, checkpoints, evaluation |
//! | `cli` (default) | the `barlow` command |
//! | `candle` | the candle custom op, on CPU tensors |
//! | `candle-cuda` | the candle op on CUDA tensors too (candle's CUDA backend) |
//!
//! The loss alone: `barlow = { version = "0.1", default-features = false, features = ["cuda"] }`.
//! CUDA is loaded at run time unless the application links it: a binary built with the kernels
//! runs on machines without a GPU, and every CUDA entry point then returns an [`Error`] saying what
//! is missing.
#![warn(missing_docs)]

/// Builder-style setters for a configuration struct, which is `#[non_exhaustive]` so that it can
/// grow: `LossConfig::default().math(Math::Tf32).path(LossPath::Gram)`.
macro_rules! setters {
    ($ty:ty { $($field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("With `", stringify!($field), "` set to `value`.")]
                #[must_use]
                pub fn $field(mut self, value: $t) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "candle")]
pub mod candle;
pub mod collective;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod io;
mod loss;
#[cfg(feature = "train")]
pub mod nn;
pub mod rng;
mod shape;
#[cfg(feature = "train")]
pub mod train;

pub use error::{Error, Result};
pub use loss::{BarlowTwinsLoss, LossConfig, LossPath, LossValue, Math};
pub use shape::Dims;

/// Whether this build embeds the CUDA kernels (it was compiled with nvcc available).
pub fn built_with_kernels() -> bool {
    #[cfg(feature = "cuda")]
    return cuda::fatbin::built();
    #[cfg(not(feature = "cuda"))]
    false
}

/// The README's examples, compiled and run as doc tests.
#[cfg(all(doctest, feature = "cli"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
