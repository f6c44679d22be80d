//! A small layer library with explicit forward and backward passes (no general autograd): the
//! pieces of a ResNet and the Barlow Twins projector, NCHW f32 on the host.
//!
//! Each layer caches what its backward pass needs during a training forward, and its backward
//! pass accumulates parameter gradients into [`Param::grad`] and returns the input gradient.
//! The heavy arithmetic goes through a [`Backend`].

mod backend;
pub mod graph;
mod layers;
mod norm;
pub mod resnet;
pub mod timed;

use crate::cpu::pool;
pub use crate::cpu::pool::PoolStats;

pub use backend::{Backend, ConvSpec, CpuBackend};
pub use layers::{BatchNorm, Conv2d, Linear, MaxPool, PlaneMoments, Relu};
pub(crate) use norm::{
    channel_stats, grad_sums as batch_norm_grad_sums, input_grad as batch_norm_input_grad,
};

/// A dense f32 tensor, row-major over `shape` (NCHW for images, NC for features).
///
/// Its buffer comes from, and goes back to, a process-wide pool of large buffers, so a training
/// step reuses the previous step's memory instead of allocating (see [`buffer_stats`]).
#[derive(Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<f32>,
}

impl Clone for Tensor {
    fn clone(&self) -> Self {
        let mut data = pool::take(self.data.len());
        data.copy_from_slice(&self.data);
        Self {
            shape: self.shape.clone(),
            data,
        }
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.data));
    }
}

/// What the pool of tensor buffers has done since the process started: after a training step
/// has run once, the steps that follow take every buffer from it.
pub fn buffer_stats() -> PoolStats {
    pool::stats()
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: pool::zeroed(shape.iter().product()),
        }
    }

    /// A tensor whose contents are unspecified (a reused buffer), for outputs written in full.
    pub(crate) fn for_overwrite(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: pool::take(shape.iter().product()),
        }
    }

    /// A tensor over existing data (`data.len()` must equal the product of `shape`).
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor shape {shape:?} does not match {} values",
            data.len()
        );
        Self {
            shape: shape.to_vec(),
            data,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The first dimension (the batch).
    pub fn batch(&self) -> usize {
        self.shape[0]
    }

    /// Elements per batch item.
    pub fn item_len(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// A trainable tensor with its gradient and the name it is saved under (torchvision's names).
#[derive(Debug, Clone)]
pub struct Param {
    /// Name in checkpoints, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Dimensions, as PyTorch stores the tensor.
    pub shape: Vec<usize>,
    /// Current values, row-major.
    pub value: Vec<f32>,
    /// Gradient accumulated by backward passes, same layout as `value`.
    pub grad: Vec<f32>,
}

impl Param {
    /// A parameter with the given initial values.
    pub fn new(name: impl Into<String>, shape: &[usize], value: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), value.len());
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            grad: vec![0.0; value.len()],
            value,
        }
    }

    /// One-dimensional parameters (biases, norm weights) skip weight decay and LARS adaptation.
    pub fn is_vector(&self) -> bool {
        self.shape.len() == 1
    }

    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }
}

/// A non-trainable tensor that is saved with the model (BatchNorm running statistics).
#[derive(Debug, Clone)]
pub struct Buffer {
    /// Name in checkpoints, e.g. `bn1.running_mean`.
    pub name: String,
    /// Dimensions (empty for a scalar such as `num_batches_tracked`).
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub value: Vec<f32>,
}

/// Visits every parameter and buffer of a model, in a fixed order.
pub trait Visit {
    /// Calls `f` on every parameter.
    fn params_mut(&mut self, f: &mut dyn FnMut(&mut Param));
    /// Calls `f` on every buffer and on the count of training batches seen (BatchNorm's
    /// `num_batches_tracked`), by name.
    fn buffers_mut(&mut self, f: &mut dyn FnMut(&mut Buffer));
}
