//! CUDA backend: the embedded kernels, thin safe wrappers over their launches and cuBLAS, and the
//! fused loss built from them.
//!
//! The application picks how CUDA is found (cudarc's `dynamic-loading`, `dynamic-linking` or
//! `static-linking`; without a choice, loading at run time). When loaded at run time, a binary
//! built with kernels still runs on a machine without a GPU: every entry point first probes for
//! the library it needs and returns [`Error::NoCudaDriver`] (or [`Error::NoCublas`], ...) instead of
//! letting the loader panic. The probes look for the same file names cudarc's loader does, so they
//! hold in every linking mode (a linked library is already in the process).

pub(crate) mod blas;
#[cfg(feature = "train")]
pub mod cudnn;
pub mod fatbin;
pub(crate) mod fused;
pub(crate) mod launch;
pub mod memory;
pub(crate) mod module;
#[cfg(feature = "bench")]
pub mod naive;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(feature = "train")]
pub mod nn;
pub mod ops;

pub use cudarc;

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, DeviceSlice, DriverError};
use std::sync::Arc;

/// Slots of the device loss output that [`crate::BarlowTwinsLoss::forward_backward_on_device`]
/// fills (as many as the buffer holds, at least one): [`LOSS_TOTAL`], [`LOSS_ON_DIAG`],
/// [`LOSS_OFF_DIAG`], [`LOSS_NON_FINITE`].
pub const DEVICE_LOSS_SLOTS: usize = 4;
/// Index of the loss in the device output.
pub const LOSS_TOTAL: usize = 0;
/// Index of the on-diagonal (invariance) term Σᵢ (1 − Cᵢᵢ)².
pub const LOSS_ON_DIAG: usize = 1;
/// Index of the off-diagonal term λ·Σᵢ≠ⱼ Cᵢⱼ².
pub const LOSS_OFF_DIAG: usize = 2;
/// Index of the non-finite flag: 1.0 when the loss is NaN or infinite (non-finite inputs; the
/// gradients are then not numbers either), else 0.0.
pub const LOSS_NON_FINITE: usize = 3;

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        drv("a CUDA driver call")(e)
    }
}

impl From<cudarc::cublas::result::CublasError> for Error {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        Error::Cublas {
            during: "a cuBLAS call".into(),
            message: e.to_string(),
        }
    }
}

/// The element types the kernels are instantiated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `f32`.
    F32,
    /// `half::bf16`.
    Bf16,
    /// `half::f16`.
    F16,
}

/// Element types the kernels read: f32, bf16 and f16.
pub trait Element:
    DeviceRepr + Copy + Send + Sync + 'static + sealed::Sealed + launch::CType
{
    /// Which one it is, to pick the kernel instantiation.
    const DTYPE: Dtype;
}
impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}
impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}

/// Element types of activations and gradients in the trainer: f32 (checking) or bf16 (speed),
/// always with f32 accumulation.
#[cfg(feature = "train")]
pub trait Act: Element + cudarc::driver::ValidAsZeroBits {
    /// cuDNN's name for the type.
    const CUDNN: cudarc::cudnn::sys::cudnnDataType_t;
    /// cuBLAS's name for the type.
    const CUBLAS: cudarc::cublas::sys::cudaDataType;
    /// Converts from f32 (rounding to nearest).
    fn from_f32(v: f32) -> Self;
    /// Converts to f32 (exact).
    fn to_f32(self) -> f32;
}
#[cfg(feature = "train")]
impl Act for f32 {
    const CUDNN: cudarc::cudnn::sys::cudnnDataType_t =
        cudarc::cudnn::sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    const CUBLAS: cudarc::cublas::sys::cudaDataType = cudarc::cublas::sys::cudaDataType::CUDA_R_32F;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}
#[cfg(feature = "train")]
impl Act for half::bf16 {
    const CUDNN: cudarc::cudnn::sys::cudnnDataType_t =
        cudarc::cudnn::sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
    const CUBLAS: cudarc::cublas::sys::cudaDataType =
        cudarc::cublas::sys::cudaDataType::CUDA_R_16BF;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// The element types Ẑ may be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HatDtype {
    /// f32, for the f32 and TF32 GEMMs.
    F32,
    /// bf16, for the bf16 GEMMs.
    Bf16,
}

/// Element types Ẑ may be stored in: f32, or bf16 for the bf16 GEMM.
pub trait HatElement: Element {
    /// Which one it is.
    const HAT: HatDtype;
}
impl HatElement for f32 {
    const HAT: HatDtype = HatDtype::F32;
}
impl HatElement for half::bf16 {
    const HAT: HatDtype = HatDtype::Bf16;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// Checks that the kernels were compiled in and that libcuda can be loaded and initialised.
/// The driver is probed once per process.
pub fn check_available() -> Result<()> {
    availability(fatbin::built(), driver_present)
}

/// The order of the checks: a build without kernels is reported before a missing driver, since
/// installing a driver would not help it.
fn availability(kernels: bool, driver: impl FnOnce() -> bool) -> Result<()> {
    if !kernels {
        return Err(Error::NoKernels);
    }
    if !driver() {
        return Err(Error::NoCudaDriver);
    }
    Ok(())
}

/// File names of library `lib` in the order cudarc's loader tries them (it keeps the first that
/// opens): unversioned, the Windows forms, the CUDA majors 13 down to 9, then `.so.1`. Written
/// out here because cudarc exposes its list only in its dynamic-loading mode.
fn library_names(lib: &str) -> Vec<String> {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    let mut names = vec![
        format!("{DLL_PREFIX}{lib}{DLL_SUFFIX}"),
        format!("{DLL_PREFIX}{lib}64{DLL_SUFFIX}"),
    ];
    for major in (9..=13).rev() {
        names.push(format!("{DLL_PREFIX}{lib}64_{major}{DLL_SUFFIX}"));
        names.push(format!("{DLL_PREFIX}{lib}64_{major}0_0{DLL_SUFFIX}"));
    }
    for major in (9..=13).rev() {
        names.push(format!("{DLL_PREFIX}{lib}{DLL_SUFFIX}.{major}"));
    }
    names.push(format!("{DLL_PREFIX}{lib}{DLL_SUFFIX}.1"));
    names
}

/// Driver entry points the crate's CUDA code reaches through cudarc. cudarc panics on the first
/// call of one its library lacks, so a library without all of them is no driver here.
const DRIVER_SYMBOLS: [&str; 24] = [
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuStreamCreate",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuEventCreate",
    "cuEventRecord",
    "cuGetErrorString",
    "cuMemGetInfo_v2",
];

/// Whether `lib` is a CUDA driver: it has every entry point the crate uses, and `cuInit`
/// succeeds (or finds no device, which `device_count` then reports).
fn is_driver(lib: &libloading::Library) -> bool {
    // SAFETY: looking a symbol up runs no code of the library; the pointers are not called.
    let complete = DRIVER_SYMBOLS
        .iter()
        .all(|s| unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }.is_ok());
    if !complete {
        return false;
    }
    // SAFETY: cuInit has this signature in every CUDA driver (CUresult cuInit(unsigned int)),
    // takes flags that must be 0, and may be called any number of times.
    let code = unsafe {
        match lib.get::<unsafe extern "C" fn(std::ffi::c_uint) -> std::ffi::c_int>(b"cuInit") {
            Ok(init) => init(0),
            Err(_) => return false,
        }
    };
    const CUDA_ERROR_NO_DEVICE: std::ffi::c_int = 100;
    code == 0 || code == CUDA_ERROR_NO_DEVICE
}

/// Whether one of the file names cudarc would try for `libs` can be opened. In the linking modes
/// the library is already in the process, so this holds there as well. Probed once per process
/// (a probe walks every name through every folder of the library path).
pub(crate) fn library_present(libs: &[&str]) -> bool {
    static SEEN: std::sync::Mutex<Vec<(String, bool)>> = std::sync::Mutex::new(Vec::new());
    let key = libs.join(",");
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, present)) = seen.iter().find(|(k, _)| *k == key) {
        return present;
    }
    let present = libs.iter().flat_map(|l| library_names(l)).any(|name| {
        // SAFETY: opening a CUDA library runs only its initializers, which have no
        // preconditions; the handle is closed at once and no symbol is looked up.
        unsafe { libloading::Library::new(name) }.is_ok()
    });
    seen.push((key, present));
    present
}

/// Whether the library cudarc would load as the driver is one. A library of that name that is
/// not a driver (or lacks an entry point) would make cudarc panic, so it counts as no driver.
fn driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        for name in library_names("cuda")
            .into_iter()
            .chain(library_names("nvcuda"))
        {
            // SAFETY: opening a CUDA library runs only its initializers, which have no
            // preconditions.
            if let Ok(lib) = unsafe { libloading::Library::new(&name) } {
                let ok = is_driver(&lib);
                if ok {
                    // Initialised: kept loaded for the process, as cudarc keeps its own handle.
                    std::mem::forget(lib);
                }
                return ok;
            }
        }
        false
    })
}

fn check_driver() -> Result<()> {
    availability(true, driver_present)
}

pub(crate) fn check_cublas() -> Result<()> {
    if !library_present(&["cublas"]) {
        return Err(Error::NoCublas);
    }
    Ok(())
}

/// Number of CUDA devices, or an error when there is no driver.
pub fn device_count() -> Result<usize> {
    check_driver()?;
    let n = CudaContext::device_count().map_err(drv("counting CUDA devices"))?;
    Ok(n.max(0) as usize)
}

/// Opens device `ordinal` (its primary context) and returns its default stream, with a clear error
/// when there is no driver or no such device.
pub fn open_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::NoDevice(format!(
            "device {ordinal} requested, {count} CUDA device(s) found"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(drv("creating a CUDA context"))?;
    Ok(ctx.default_stream())
}

/// How the project's virtual CUDA device (`tests/vgpu`, for running the GPU suite on machines
/// without a GPU) names itself. Its kernels and library calls run on the host: it checks launches,
/// library calls and stream order, and nothing timed on it is a GPU figure.
pub const VIRTUAL_DEVICE: &str = "barlow virtual CUDA device";

/// Whether `ctx` is on the virtual CUDA device rather than a GPU.
pub fn is_virtual(ctx: &CudaContext) -> bool {
    ctx.name().is_ok_and(|n| n.starts_with(VIRTUAL_DEVICE))
}

/// The device label of measurements on `stream`: `cuda`, or `vgpu` on the virtual device, so its
/// timings never pass for a GPU's.
pub fn device_label(stream: &CudaStream) -> &'static str {
    if is_virtual(stream.context()) {
        "vgpu"
    } else {
        "cuda"
    }
}

/// Maps a driver error to [`Error`], naming the call that failed; out-of-memory gets its own variant.
pub(crate) fn drv(during: impl Into<String>) -> impl Fn(DriverError) -> Error {
    let during = during.into();
    move |e| match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfDeviceMemory {
            during: during.clone(),
            bytes: 0,
        },
        cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => Error::NoDevice(e.to_string()),
        _ => Error::Cuda {
            during: during.clone(),
            message: e.to_string(),
        },
    }
}

/// Allocates `len` elements on `stream`, reporting the byte count if memory runs out.
pub(crate) fn alloc<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    len: usize,
    what: &'static str,
) -> Result<cudarc::driver::CudaSlice<T>> {
    // SAFETY: the memory is uninitialized; every buffer allocated here is fully written by a kernel
    // or a GEMM before it is read (the callers document which launch writes it).
    unsafe { stream.alloc::<T>(len.max(1)) }.map_err(|e| match drv(what)(e) {
        Error::OutOfDeviceMemory { during, .. } => Error::OutOfDeviceMemory {
            during,
            bytes: len * std::mem::size_of::<T>(),
        },
        other => other,
    })
}

/// A device buffer must live in the stream's context.
pub(crate) fn check_context<T>(
    name: &'static str,
    buf: &impl DeviceSlice<T>,
    stream: &CudaStream,
) -> Result<()> {
    if buf.stream().context().cu_ctx() != stream.context().cu_ctx() {
        return Err(Error::WrongContext { name });
    }
    Ok(())
}

/// A device loss output holds at least one f32, in the stream's context.
pub(crate) fn check_loss_output(out: &impl DeviceSlice<f32>, stream: &CudaStream) -> Result<()> {
    if out.len() == 0 {
        return Err(Error::BufferTooSmall {
            name: "loss output",
            len: 0,
            needed: 1,
        });
    }
    check_context("loss output", out, stream)
}

/// Sizes passed to kernels and cuBLAS as 32-bit ints must fit.
pub(crate) fn check_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::TooLarge {
        what: format!("{what} = {v} exceeds the 32-bit limit of cuBLAS"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_names_what_is_missing() {
        let e = availability(false, || true).unwrap_err();
        assert!(matches!(e, Error::NoKernels));
        assert!(e
            .to_string()
            .contains("built without CUDA kernels: install nvcc"));
        let e = availability(true, || false).unwrap_err();
        assert!(matches!(e, Error::NoCudaDriver));
        assert!(availability(true, || true).is_ok());
    }
}
