//! The compiled half of the `barlow` Python package: the fused loss on tensors' memory, handed
//! over as data pointers by the Python wrapper (`barlow/__init__.py`), which checks dtype, device,
//! shape and contiguity before calling and keeps the tensors alive across the call.

mod device;

use barlow::cpu::reference;
use barlow::{BarlowTwinsLoss, Dims, Error, LossConfig, LossPath, Math};
use device::{Call, Devices};
use half::{bf16, f16};
use pyo3::exceptions::{PyFloatingPointError, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// barlow's error as the Python exception a caller would catch for it, with barlow's message.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::ShapeMismatch { .. }
        | Error::BatchTooSmall { .. }
        | Error::EmptyFeatures
        | Error::TooLarge { .. }
        | Error::BufferTooSmall { .. }
        | Error::WrongContext { .. }
        | Error::InvalidConfig(_) => PyValueError::new_err(msg),
        Error::NonFinite { .. } => PyFloatingPointError::new_err(msg),
        Error::OutOfHostMemory { .. } | Error::OutOfDeviceMemory { .. } => {
            PyMemoryError::new_err(msg)
        }
        _ => PyRuntimeError::new_err(msg),
    }
}

/// N·D, the elements of one view, or an error when it overflows.
fn elements(n: usize, d: usize) -> PyResult<usize> {
    n.checked_mul(d)
        .ok_or_else(|| PyValueError::new_err("N×D overflows"))
}

/// A loss configuration and its workspaces (one on the host, one per CUDA device; calls take
/// turns).
#[pyclass(frozen)]
struct Loss {
    inner: BarlowTwinsLoss,
    config: LossConfig,
    devices: Devices,
    lambda: f64,
    eps: f64,
}

/// (total, on-diagonal term, off-diagonal term already × λ)
type Terms = (f64, f64, f64);

#[pymethods]
impl Loss {
    #[new]
    fn new(lambd: f32, eps: f32, math: &str, path: &str) -> PyResult<Self> {
        let math = match math {
            "f32" => Math::F32,
            "tf32" => Math::Tf32,
            "bf16" => Math::Bf16,
            other => {
                return Err(PyValueError::new_err(format!(
                    "math must be \"f32\", \"tf32\" or \"bf16\", not {other:?}"
                )))
            }
        };
        let path = match path {
            "auto" => LossPath::Auto,
            "direct" => LossPath::Direct,
            "gram" => LossPath::Gram,
            other => {
                return Err(PyValueError::new_err(format!(
                    "path must be \"auto\", \"direct\" or \"gram\", not {other:?}"
                )))
            }
        };
        let config = LossConfig::default()
            .lambda(lambd)
            .eps(eps)
            .math(math)
            .path(path);
        Ok(Self {
            inner: BarlowTwinsLoss::new(config).map_err(to_py)?,
            config,
            devices: Devices::default(),
            lambda: f64::from(lambd),
            eps: f64::from(eps),
        })
    }

    /// The loss of two contiguous f32 N×D CPU buffers at `za` and `zb`; with `dza` and `dzb`
    /// (N×D f32 each), also dL/dZ there.
    #[pyo3(signature = (za, zb, n, d, dza=None, dzb=None))]
    #[allow(clippy::too_many_arguments)]
    fn cpu_f32(
        &self,
        py: Python<'_>,
        za: usize,
        zb: usize,
        n: usize,
        d: usize,
        dza: Option<usize>,
        dzb: Option<usize>,
    ) -> PyResult<Terms> {
        let len = elements(n, d)?;
        let dims = Dims::new(n, d);
        py.detach(|| {
            // SAFETY: the wrapper passes data pointers of live, contiguous f32 CPU tensors of
            // N×D elements each (it checks dtype, device, shape and contiguity, and holds the
            // tensors until this returns); the gradients are fresh tensors, distinct from the
            // inputs.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(za as *const f32, len),
                    std::slice::from_raw_parts(zb as *const f32, len),
                )
            };
            let v = match (dza, dzb) {
                (Some(ga), Some(gb)) => {
                    // SAFETY: as above.
                    let (ga, gb) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(ga as *mut f32, len),
                            std::slice::from_raw_parts_mut(gb as *mut f32, len),
                        )
                    };
                    self.inner.forward_backward_cpu(a, b, dims, ga, gb)
                }
                _ => self.inner.forward_cpu(a, b, dims),
            }
            .map_err(to_py)?;
            Ok((v.total, v.on_diag, v.off_diag))
        })
    }

    /// As `cpu_f32` on float64 buffers, through the float64 reference (for gradcheck).
    #[pyo3(signature = (za, zb, n, d, dza=None, dzb=None))]
    #[allow(clippy::too_many_arguments)]
    fn cpu_f64(
        &self,
        py: Python<'_>,
        za: usize,
        zb: usize,
        n: usize,
        d: usize,
        dza: Option<usize>,
        dzb: Option<usize>,
    ) -> PyResult<Terms> {
        let len = elements(n, d)?;
        py.detach(|| {
            // SAFETY: as in `cpu_f32`, for f64 tensors.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(za as *const f64, len),
                    std::slice::from_raw_parts(zb as *const f64, len),
                )
            };
            let r = reference::forward_backward(a, b, Dims::new(n, d), self.lambda, self.eps)
                .map_err(to_py)?;
            if !r.total.is_finite() {
                return Err(PyFloatingPointError::new_err(
                    "the loss is not finite (non-finite or overflowing inputs)",
                ));
            }
            if let (Some(ga), Some(gb)) = (dza, dzb) {
                // SAFETY: as in `cpu_f32`.
                unsafe {
                    std::slice::from_raw_parts_mut(ga as *mut f64, len).copy_from_slice(&r.grad_za);
                    std::slice::from_raw_parts_mut(gb as *mut f64, len).copy_from_slice(&r.grad_zb);
                }
            }
            Ok((r.total, r.on_diag, r.off_diag))
        })
    }

    /// Queues the loss of two contiguous N×D CUDA buffers of `dtype` ("float32", "bfloat16",
    /// "float16") on device `ordinal` after the work on PyTorch's stream `stream`, writing
    /// [total, on-diagonal, off-diagonal, non-finite flag] (the first `out_len`, f32) to `out`
    /// and, with `dza` and `dzb`, dL/dZ there; PyTorch's later work on `stream` is ordered after
    /// it. Returns without waiting for the device.
    #[pyo3(signature = (dtype, ordinal, stream, za, zb, n, d, out, out_len, dza=None, dzb=None))]
    #[allow(clippy::too_many_arguments)]
    fn cuda(
        &self,
        py: Python<'_>,
        dtype: &str,
        ordinal: usize,
        stream: u64,
        za: u64,
        zb: u64,
        n: usize,
        d: usize,
        out: u64,
        out_len: usize,
        dza: Option<u64>,
        dzb: Option<u64>,
    ) -> PyResult<()> {
        elements(n, d)?;
        let call = Call {
            ordinal,
            stream,
            za,
            zb,
            dims: Dims::new(n, d),
            out,
            out_len,
            grads: dza.zip(dzb),
        };
        py.detach(|| {
            // SAFETY: the wrapper passes data pointers of live, contiguous CUDA tensors of device
            // `ordinal` with the sizes and dtype given (it checks dtype, device, shape and
            // contiguity), fresh tensors for `out` and the gradients, and PyTorch's current
            // stream of that device, which PyTorch keeps alive; the tensors are used on that
            // stream, so PyTorch's caching allocator reuses their memory only after this work.
            unsafe {
                match dtype {
                    "float32" => self.devices.run::<f32>(&self.config, &call),
                    "bfloat16" => self.devices.run::<bf16>(&self.config, &call),
                    "float16" => self.devices.run::<f16>(&self.config, &call),
                    other => {
                        return Err(PyValueError::new_err(format!(
                            "CUDA tensors must be float32, bfloat16 or float16, not {other}"
                        )))
                    }
                }
            }
            .map_err(to_py)
        })
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Loss>()?;
    m.add("BUILT_WITH_KERNELS", barlow::built_with_kernels())?;
    Ok(())
}
