//! The fused loss as a candle operation with gradients: on CPU tensors (feature `candle`) and on
//! CUDA tensors (feature `candle-cuda`, which turns on candle's own CUDA backend).
//!
//! On CUDA the op reads the tensors' device memory in place, queues its kernels on the tensors'
//! stream and writes the loss into a new device tensor: no copy, no wait on the host. Non-finite
//! inputs then give a NaN loss (and NaN gradients) instead of an error, since saying so would take
//! a wait; check the loss where the trainer reads it anyway.
//!
//! [`BarlowTwinsOp::loss`] takes the two views' projector outputs (N×D tensors) and returns the
//! loss as a 0-d f32 tensor that backpropagates into both: candle's autograd calls the op's
//! backward, which runs the fused forward-backward and scales dL/dZ by the incoming gradient.
//!
//! ```
//! use barlow::candle::BarlowTwinsOp;
//! use barlow::LossConfig;
//! use candle_core::{Device, Tensor, Var};
//!
//! let za = Var::from_tensor(&Tensor::randn(0f32, 1.0, (16, 8), &Device::Cpu)?)?;
//! let zb = Tensor::randn(0f32, 1.0, (16, 8), &Device::Cpu)?;
//! let op = BarlowTwinsOp::new(LossConfig::default())?;
//! let loss = op.loss(za.as_tensor(), &zb)?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(&za).map(|g| g.dims().to_vec()), Some(vec![16, 8]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::{BarlowTwinsLoss, Dims, LossConfig};
use candle_core::backend::BackendStorage;
#[cfg(feature = "candle-cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use std::sync::Arc;

/// The Barlow Twins loss as a candle op. Cloning is cheap and shares the loss's workspace.
#[derive(Clone)]
pub struct BarlowTwinsOp {
    loss: Arc<BarlowTwinsLoss>,
}

impl std::fmt::Debug for BarlowTwinsOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarlowTwinsOp")
            .field("config", self.loss.config())
            .finish()
    }
}

impl From<crate::Error> for candle_core::Error {
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

impl BarlowTwinsOp {
    /// An op with the given loss configuration (validated here).
    pub fn new(config: LossConfig) -> crate::Result<Self> {
        Ok(Self {
            loss: Arc::new(BarlowTwinsLoss::new(config)?),
        })
    }

    /// The loss of `za` and `zb` (both N×D, f32, on the same device) as a 0-d f32 tensor, with
    /// gradients for both inputs when they are tracked.
    pub fn loss(&self, za: &Tensor, zb: &Tensor) -> candle_core::Result<Tensor> {
        za.apply_op2(zb, Forward(self.clone()))
    }

    /// `(dL/dZa, dL/dZb)` of the loss, without autograd (each N×D, like the inputs).
    pub fn gradients(&self, za: &Tensor, zb: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let both = za.apply_op2_no_bwd(zb, &Gradients(self.clone()))?;
        Ok((both.get(0)?, both.get(1)?))
    }
}

/// The forward op: the loss as a 0-d tensor.
struct Forward(BarlowTwinsOp);
/// The gradient op: dL/dZa and dL/dZb stacked into one 2×N×D tensor.
struct Gradients(BarlowTwinsOp);

/// N and D of two inputs that must be equal N×D matrices.
fn dims_of(l1: &Layout, l2: &Layout) -> candle_core::Result<Dims> {
    let (a, b) = (l1.dims(), l2.dims());
    if a.len() != 2 || a != b {
        return Err(candle_core::Error::Msg(format!(
            "barlow twins loss: the two views must be N×D matrices of one shape, got {a:?} and \
             {b:?}"
        )));
    }
    Ok(Dims::new(a[0], a[1]))
}

/// The elements of a contiguous f32 CPU tensor.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(candle_core::Error::Msg(format!(
            "barlow twins loss: `{name}` is {:?}; the CPU path takes f32 (convert with \
             .to_dtype(DType::F32))",
            s.dtype()
        )));
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => Err(candle_core::Error::Msg(format!(
            "barlow twins loss: `{name}` is not contiguous (call .contiguous() first)"
        ))),
    }
}

/// The elements of a contiguous f32 CUDA tensor, as a view of its device memory.
#[cfg(feature = "candle-cuda")]
fn cuda_f32<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<cudarc::driver::CudaView<'a, f32>> {
    let slice = s.as_cuda_slice::<f32>().map_err(|_| {
        candle_core::Error::Msg(format!(
            "barlow twins loss: `{name}` is {:?}; the CUDA path takes f32 (convert with \
             .to_dtype(DType::F32))",
            s.dtype()
        ))
    })?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => Err(candle_core::Error::Msg(format!(
            "barlow twins loss: `{name}` is not contiguous (call .contiguous() first)"
        ))),
    }
}

/// The two views of a CUDA op call: N and D, and both inputs as views of their device memory,
/// which must be on one device.
#[cfg(feature = "candle-cuda")]
fn cuda_inputs<'a>(
    s1: &'a CudaStorage,
    l1: &Layout,
    s2: &'a CudaStorage,
    l2: &Layout,
) -> candle_core::Result<(Dims, [cudarc::driver::CudaView<'a, f32>; 2])> {
    use candle_core::backend::BackendDevice;
    let dims = dims_of(l1, l2)?;
    if !s1.device.same_device(&s2.device) {
        return Err(candle_core::Error::Msg(
            "barlow twins loss: the two views are on different CUDA devices".into(),
        ));
    }
    Ok((dims, [cuda_f32(s1, l1, "za")?, cuda_f32(s2, l2, "zb")?]))
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "barlow-twins-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims_of(l1, l2)?;
        let (za, zb) = (cpu_f32(s1, l1, "za")?, cpu_f32(s2, l2, "zb")?);
        let v = self.0.loss.forward_cpu(za, zb, dims)?;
        Ok((CpuStorage::F32(vec![v.total as f32]), Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (dims, [za, zb]) = cuda_inputs(s1, l1, s2, l2)?;
        let device = s1.device.clone();
        let stream = device.cuda_stream();
        let mut out = device.alloc_zeros::<f32>(1)?;
        self.0
            .loss
            .forward_on_device(&stream, &za, &zb, dims, &mut out)?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(())))
    }

    fn bwd(
        &self,
        za: &Tensor,
        zb: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dza, dzb) = self.0.gradients(za, zb)?;
        Ok((
            Some(dza.broadcast_mul(grad)?),
            Some(dzb.broadcast_mul(grad)?),
        ))
    }
}

impl CustomOp2 for Gradients {
    fn name(&self) -> &'static str {
        "barlow-twins-loss-gradients"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims_of(l1, l2)?;
        let (za, zb) = (cpu_f32(s1, l1, "za")?, cpu_f32(s2, l2, "zb")?);
        let nd = dims.n * dims.d;
        let mut both = vec![0f32; 2 * nd];
        let (dza, dzb) = both.split_at_mut(nd);
        self.0.loss.forward_backward_cpu(za, zb, dims, dza, dzb)?;
        Ok((CpuStorage::F32(both), Shape::from((2, dims.n, dims.d))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (dims, [za, zb]) = cuda_inputs(s1, l1, s2, l2)?;
        let device = s1.device.clone();
        let stream = device.cuda_stream();
        let nd = dims.n * dims.d;
        let mut both = device.alloc_zeros::<f32>(2 * nd)?;
        let mut out = device.alloc_zeros::<f32>(1)?;
        {
            let (mut dza, mut dzb) = both.split_at_mut(nd);
            self.0.loss.forward_backward_on_device(
                &stream, &za, &zb, dims, &mut dza, &mut dzb, &mut out,
            )?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(both, device),
            Shape::from((2, dims.n, dims.d)),
        ))
    }
}
