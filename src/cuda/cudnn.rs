//! Convolutions through cuDNN (loaded at run time): NHWC tensors, KRSC filters, f32 or bf16
//! elements with f32 accumulation.
//!
//! Each (geometry, batch) gets a plan on first use: descriptors, the algorithm for the forward,
//! backward-data and backward-filter passes (ranked by timing them, cudnnFind*, or by cuDNN's
//! heuristics when that fails or [`AlgoSearch::Heuristic`] asks; deterministic algorithms whose workspace
//! fits the cap are preferred), and their workspace sizes. Plans and one shared
//! workspace are kept for the life of the object, so steady-state steps allocate nothing.

use super::{alloc, check_context, drv, Act};
use crate::error::{Error, Result};
use crate::nn::ConvSpec;
use cudarc::cudnn::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

/// Largest workspace an algorithm may ask for.
const WORKSPACE_CAP: usize = 1 << 30;

/// Checks that libcudnn can be loaded.
pub fn check_cudnn() -> Result<()> {
    if super::library_present(&["cudnn"]) {
        Ok(())
    } else {
        Err(Error::NoCudnn)
    }
}

fn status(during: &str) -> impl Fn(sys::cudnnStatus_t) -> Result<()> + '_ {
    move |s| match s {
        sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS => Ok(()),
        sys::cudnnStatus_t::CUDNN_STATUS_ALLOC_FAILED => Err(Error::OutOfDeviceMemory {
            during: during.to_string(),
            bytes: 0,
        }),
        other => Err(Error::Cudnn {
            during: during.to_string(),
            message: format!("{other:?}"),
        }),
    }
}

fn int(what: &str, v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::TooLarge {
        what: format!("{what} = {v} exceeds cuDNN's 32-bit limit"),
    })
}

/// The descriptors of one convolution at one batch size.
struct Descriptors {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Descriptors {
    fn new(spec: &ConvSpec, n: usize, dtype: sys::cudnnDataType_t, fma_only: bool) -> Result<Self> {
        let mut d = Descriptors {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let (ni, ci, hi, wi) = (
            int("batch", n)?,
            int("in channels", spec.in_c)?,
            int("height", spec.h)?,
            int("width", spec.w)?,
        );
        let (co, ho, wo) = (
            int("out channels", spec.out_c)?,
            int("out height", spec.ho())?,
            int("out width", spec.wo())?,
        );
        let (k, s, p) = (
            int("kernel", spec.k)?,
            int("stride", spec.stride)?,
            int("padding", spec.pad)?,
        );
        let math = if fma_only {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        // SAFETY: each descriptor is created before it is set; `d` owns them from creation on, so
        // its Drop destroys exactly the ones that exist, even when a later call fails.
        unsafe {
            status("creating a tensor descriptor")(sys::cudnnCreateTensorDescriptor(&mut d.x))?;
            status("creating a tensor descriptor")(sys::cudnnCreateTensorDescriptor(&mut d.y))?;
            status("creating a filter descriptor")(sys::cudnnCreateFilterDescriptor(&mut d.w))?;
            status("creating a convolution descriptor")(sys::cudnnCreateConvolutionDescriptor(
                &mut d.conv,
            ))?;
            status("describing the convolution input")(sys::cudnnSetTensor4dDescriptor(
                d.x, nhwc, dtype, ni, ci, hi, wi,
            ))?;
            status("describing the convolution output")(sys::cudnnSetTensor4dDescriptor(
                d.y, nhwc, dtype, ni, co, ho, wo,
            ))?;
            status("describing the filter")(sys::cudnnSetFilter4dDescriptor(
                d.w, dtype, nhwc, co, ci, k, k,
            ))?;
            status("describing the convolution")(sys::cudnnSetConvolution2dDescriptor(
                d.conv,
                p,
                p,
                s,
                s,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            ))?;
            status("setting the convolution math type")(sys::cudnnSetConvolutionMathType(
                d.conv, math,
            ))?;
        }
        Ok(d)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each handle is either null (never created) or was created by `new` and is
        // destroyed once, here. Errors on destruction cannot be acted on and are ignored.
        unsafe {
            if !self.x.is_null() {
                sys::cudnnDestroyTensorDescriptor(self.x);
            }
            if !self.y.is_null() {
                sys::cudnnDestroyTensorDescriptor(self.y);
            }
            if !self.w.is_null() {
                sys::cudnnDestroyFilterDescriptor(self.w);
            }
            if !self.conv.is_null() {
                sys::cudnnDestroyConvolutionDescriptor(self.conv);
            }
        }
    }
}

/// A planned convolution: descriptors, the three algorithms and their workspace needs.
struct Plan {
    d: Descriptors,
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    /// None until a backward-data pass is asked for: a network's first convolution never
    /// computes the gradient of its input, and planning it can fail where nothing needs it.
    bwd_data: Option<sys::cudnnConvolutionBwdDataAlgo_t>,
    bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    /// The math type each pass's algorithm was ranked with (None: keep FMA-only math).
    maths: Option<[sys::cudnnMathType_t; 3]>,
    workspace: usize,
}

impl Plan {
    /// Sets the math type the chosen algorithm of pass `i` (forward, data, filter) expects.
    fn math(&self, i: usize) -> Result<()> {
        if let Some(m) = self.maths {
            // SAFETY: the descriptor is live; this only changes a host-side field of it.
            unsafe {
                status("setting the convolution math type")(sys::cudnnSetConvolutionMathType(
                    self.d.conv,
                    m[i],
                ))?;
            }
        }
        Ok(())
    }
}

/// A candidate of cuDNN's ranking: algorithm, status, workspace bytes, determinism, math type,
/// and the milliseconds it took when the ranking timed it (cudnnFind*; not above 0 otherwise).
type Ranked<A> = (
    A,
    sys::cudnnStatus_t,
    usize,
    sys::cudnnDeterminism_t,
    sys::cudnnMathType_t,
    f32,
);

/// Picks from cuDNN's ranked candidates: the fastest deterministic one that succeeded and fits
/// the cap (by measured time where the ranking timed them, else in the ranking's order), else the
/// fastest that succeeded and fits.
fn choose<A: Copy>(ranked: &[Ranked<A>], what: &str) -> Result<(A, sys::cudnnMathType_t)> {
    let ok =
        |r: &&Ranked<A>| r.1 == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && r.2 <= WORKSPACE_CAP;
    // Untimed candidates sort after timed ones and keep their order among themselves.
    let time = |r: &Ranked<A>| if r.5 > 0.0 { r.5 } else { f32::INFINITY };
    let fastest = |deterministic: bool| {
        ranked
            .iter()
            .filter(ok)
            .filter(|r| !deterministic || r.3 == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC)
            .min_by(|a, b| time(a).total_cmp(&time(b)))
    };
    fastest(true)
        .or_else(|| fastest(false))
        .map(|r| (r.0, r.4))
        .ok_or_else(|| Error::Cudnn {
            during: format!("choosing a {what} algorithm"),
            message: "no algorithm supports this convolution".into(),
        })
}

/// How a convolution's algorithms are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AlgoSearch {
    /// Time the candidates on the device (cudnnFind*, what a framework's autotuner does), falling
    /// back to the heuristic ranking when that fails.
    #[default]
    Benchmark,
    /// cuDNN's heuristic ranking only: no timing runs, the same choice on every run.
    Heuristic,
}

/// The cuDNN handle of one stream, with its plans and workspace, for element type `A`.
pub struct Convolutions<A: Act> {
    handle: sys::cudnnHandle_t,
    stream: Arc<CudaStream>,
    fma_only: bool,
    search: AlgoSearch,
    plans: HashMap<(ConvSpec, usize), Plan>,
    workspace: Option<CudaSlice<u8>>,
    _elem: std::marker::PhantomData<A>,
}

impl<A: Act> Convolutions<A> {
    /// A handle bound to `stream`. `fma_only` forbids tensor-core math (for checking f32 results
    /// without TF32 rounding); `search` says how algorithms are chosen.
    pub fn new(stream: &Arc<CudaStream>, fma_only: bool, search: AlgoSearch) -> Result<Self> {
        check_cudnn()?;
        stream
            .context()
            .bind_to_thread()
            .map_err(drv("making the stream's context current"))?;
        let mut handle: sys::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: cudnnCreate writes a new handle into `handle`; on success it is owned by `this`
        // (destroyed in Drop), and the stream outlives it because `this` holds an Arc to it.
        unsafe {
            status("creating a cuDNN handle")(sys::cudnnCreate(&mut handle))?;
        }
        let this = Self {
            handle,
            stream: stream.clone(),
            fma_only,
            search,
            plans: HashMap::new(),
            workspace: None,
            _elem: std::marker::PhantomData,
        };
        // SAFETY: both the handle and the stream are live.
        unsafe {
            status("binding cuDNN to a stream")(sys::cudnnSetStream(
                this.handle,
                stream.cu_stream() as sys::cudaStream_t,
            ))?;
        }
        Ok(this)
    }

    fn plan(&mut self, spec: &ConvSpec, n: usize, data: bool) -> Result<&Plan> {
        // cuDNN calls do not make the stream's context current themselves.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(drv("making the stream's context current"))?;
        let key = (*spec, n);
        let have = self.plans.get(&key).map(|p| p.bwd_data.is_some());
        if have.is_none() || (data && have == Some(false)) {
            let plan = self.make_plan(spec, n, data)?;
            let need = plan.workspace;
            if self.workspace.as_ref().map_or(0, |w| w.len()) < need {
                self.workspace = None;
                self.workspace = Some(alloc(&self.stream, need, "allocating cuDNN workspace")?);
            }
            self.plans.insert(key, plan);
        }
        Ok(&self.plans[&key])
    }

    fn make_plan(&self, spec: &ConvSpec, n: usize, data: bool) -> Result<Plan> {
        const N: usize = 16;
        let d = Descriptors::new(spec, n, A::CUDNN, self.fma_only)?;
        // Benchmarked ranking first, cuDNN's heuristic ranking when that fails or is not wanted.
        let find = self.search == AlgoSearch::Benchmark;
        type FwdRank = unsafe fn(
            sys::cudnnHandle_t,
            sys::cudnnTensorDescriptor_t,
            sys::cudnnFilterDescriptor_t,
            sys::cudnnConvolutionDescriptor_t,
            sys::cudnnTensorDescriptor_t,
            c_int,
            *mut c_int,
            *mut sys::cudnnConvolutionFwdAlgoPerf_t,
        ) -> sys::cudnnStatus_t;
        type DataRank = unsafe fn(
            sys::cudnnHandle_t,
            sys::cudnnFilterDescriptor_t,
            sys::cudnnTensorDescriptor_t,
            sys::cudnnConvolutionDescriptor_t,
            sys::cudnnTensorDescriptor_t,
            c_int,
            *mut c_int,
            *mut sys::cudnnConvolutionBwdDataAlgoPerf_t,
        ) -> sys::cudnnStatus_t;
        type FilterRank = unsafe fn(
            sys::cudnnHandle_t,
            sys::cudnnTensorDescriptor_t,
            sys::cudnnTensorDescriptor_t,
            sys::cudnnConvolutionDescriptor_t,
            sys::cudnnFilterDescriptor_t,
            c_int,
            *mut c_int,
            *mut sys::cudnnConvolutionBwdFilterAlgoPerf_t,
        ) -> sys::cudnnStatus_t;
        let fwd_rankers: [FwdRank; 2] = [
            sys::cudnnFindConvolutionForwardAlgorithm,
            sys::cudnnGetConvolutionForwardAlgorithm_v7,
        ];
        let data_rankers: [DataRank; 2] = [
            sys::cudnnFindConvolutionBackwardDataAlgorithm,
            sys::cudnnGetConvolutionBackwardDataAlgorithm_v7,
        ];
        let filter_rankers: [FilterRank; 2] = [
            sys::cudnnFindConvolutionBackwardFilterAlgorithm,
            sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7,
        ];
        // Without timing, only the heuristic (second) ranking.
        let from = usize::from(!find);
        // The first ranking that succeeds and offers a usable algorithm wins.
        macro_rules! pick {
            ($rankers:expr, $perf:ty, $what:expr, $a:expr, $b:expr, $c:expr) => {{
                let mut result = Err(Error::Cudnn {
                    during: format!("choosing a {} algorithm", $what),
                    message: "no ranking ran".into(),
                });
                for rank in &$rankers[from..] {
                    let mut count: c_int = 0;
                    // SAFETY: the perf structs are plain C data; all zeros is a valid value.
                    let mut perf = [unsafe { std::mem::zeroed::<$perf>() }; N];
                    // SAFETY: every descriptor is live and set; the perf array holds N entries
                    // and cuDNN writes at most the requested count (N), reporting how many in
                    // `count`.
                    let st = unsafe {
                        rank(
                            self.handle,
                            $a,
                            $b,
                            d.conv,
                            $c,
                            N as c_int,
                            &mut count,
                            perf.as_mut_ptr(),
                        )
                    };
                    result = status(&format!("ranking {} algorithms", $what))(st).and_then(|()| {
                        let ranked: Vec<_> = perf[..(count.max(0) as usize).min(N)]
                            .iter()
                            .map(|p| {
                                (
                                    p.algo,
                                    p.status,
                                    p.memory,
                                    p.determinism,
                                    p.mathType,
                                    p.time,
                                )
                            })
                            .collect();
                        choose(&ranked, $what)
                    });
                    if result.is_ok() {
                        break;
                    }
                }
                result
            }};
        }
        let fwd = pick!(
            fwd_rankers,
            sys::cudnnConvolutionFwdAlgoPerf_t,
            "forward convolution",
            d.x,
            d.w,
            d.y
        )?;
        let bwd_data = if data {
            Some(pick!(
                data_rankers,
                sys::cudnnConvolutionBwdDataAlgoPerf_t,
                "backward-data convolution",
                d.w,
                d.y,
                d.x
            )?)
        } else {
            None
        };
        let bwd_filter = pick!(
            filter_rankers,
            sys::cudnnConvolutionBwdFilterAlgoPerf_t,
            "backward-filter convolution",
            d.x,
            d.y,
            d.w
        )?;
        // The heuristic's memory figure is an estimate; ask for the exact sizes, each under
        // the math type its pass will run with.
        let maths =
            (!self.fma_only).then_some([fwd.1, bwd_data.map_or(fwd.1, |b| b.1), bwd_filter.1]);
        let set_math = |i: usize| -> Result<()> {
            if let Some(m) = maths {
                // SAFETY: live descriptor; host-side field only.
                unsafe {
                    status("setting the convolution math type")(sys::cudnnSetConvolutionMathType(
                        d.conv, m[i],
                    ))?;
                }
            }
            Ok(())
        };
        let mut sizes = [0usize; 3];
        set_math(0)?;
        // SAFETY: live descriptors and handle; each call writes one usize.
        unsafe {
            status("sizing the forward workspace")(sys::cudnnGetConvolutionForwardWorkspaceSize(
                self.handle,
                d.x,
                d.w,
                d.conv,
                d.y,
                fwd.0,
                &mut sizes[0],
            ))?;
        }
        if let Some(b) = bwd_data {
            set_math(1)?;
            // SAFETY: as above.
            unsafe {
                status("sizing the backward-data workspace")(
                    sys::cudnnGetConvolutionBackwardDataWorkspaceSize(
                        self.handle,
                        d.w,
                        d.y,
                        d.conv,
                        d.x,
                        b.0,
                        &mut sizes[1],
                    ),
                )?;
            }
        }
        set_math(2)?;
        // SAFETY: as above.
        unsafe {
            status("sizing the backward-filter workspace")(
                sys::cudnnGetConvolutionBackwardFilterWorkspaceSize(
                    self.handle,
                    d.x,
                    d.y,
                    d.conv,
                    d.w,
                    bwd_filter.0,
                    &mut sizes[2],
                ),
            )?;
        }
        Ok(Plan {
            d,
            fwd: fwd.0,
            bwd_data: bwd_data.map(|b| b.0),
            bwd_filter: bwd_filter.0,
            // With FMA-only math the ranked math types may say "default", which for f32 would
            // allow TF32 again: keep FMA.
            maths,
            workspace: sizes.into_iter().max().unwrap_or(0),
        })
    }

    /// Plans `spec` at batch `n` now (the first step would otherwise pay for it), with its
    /// backward-data pass when `data` (every convolution but one whose input is the images).
    pub fn prepare(&mut self, spec: &ConvSpec, n: usize, data: bool) -> Result<()> {
        self.plan(spec, n, data).map(|_| ())
    }

    /// Number of planned (geometry, batch) pairs.
    pub fn planned(&self) -> usize {
        self.plans.len()
    }

    fn check<T>(
        &self,
        name: &'static str,
        buf: &impl cudarc::driver::DeviceSlice<T>,
        need: usize,
    ) -> Result<()> {
        check_context(name, buf, &self.stream)?;
        if buf.len() < need {
            return Err(Error::BufferTooSmall {
                name,
                len: buf.len(),
                needed: need,
            });
        }
        Ok(())
    }

    fn sizes(spec: &ConvSpec, n: usize) -> (usize, usize, usize) {
        (
            n * spec.h * spec.w * spec.in_c,
            n * spec.ho() * spec.wo() * spec.out_c,
            spec.out_c * spec.k * spec.k * spec.in_c,
        )
    }

    /// `y = conv(x, w)`: x [n, h, w, in_c], w [out_c, k, k, in_c], y [n, ho, wo, out_c].
    pub fn forward(
        &mut self,
        spec: &ConvSpec,
        n: usize,
        x: &impl DevicePtr<A>,
        w: &impl DevicePtr<A>,
        y: &mut impl DevicePtrMut<A>,
    ) -> Result<()> {
        let (xl, yl, wl) = Self::sizes(spec, n);
        self.check("x", x, xl)?;
        self.check("w", w, wl)?;
        self.check("y", y, yl)?;
        self.plan(spec, n, false)?;
        let s = self.stream.clone();
        let plan = &self.plans[&(*spec, n)];
        let (ws, ws_len) = workspace_ptr(&self.workspace, &s);
        let (px, _gx) = x.device_ptr(&s);
        let (pw, _gw) = w.device_ptr(&s);
        let (py, _gy) = y.device_ptr_mut(&s);
        plan.math(0)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the plan's descriptors describe exactly these extents (checked above) in `A`'s
        // element type, the workspace holds at least the plan's size, and the handle is bound
        // to the stream every pointer was taken for.
        unsafe {
            status("cudnnConvolutionForward")(sys::cudnnConvolutionForward(
                self.handle,
                &alpha as *const f32 as *const c_void,
                plan.d.x,
                px as *const c_void,
                plan.d.w,
                pw as *const c_void,
                plan.d.conv,
                plan.fwd,
                ws as *mut c_void,
                ws_len,
                &beta as *const f32 as *const c_void,
                plan.d.y,
                py as *mut c_void,
            ))
        }
    }

    /// `dx (+)= conv_transpose(dy, w)`: added to `dx` when `accumulate`, else written.
    pub fn backward_data(
        &mut self,
        spec: &ConvSpec,
        n: usize,
        w: &impl DevicePtr<A>,
        dy: &impl DevicePtr<A>,
        dx: &mut impl DevicePtrMut<A>,
        accumulate: bool,
    ) -> Result<()> {
        let (xl, yl, wl) = Self::sizes(spec, n);
        self.check("w", w, wl)?;
        self.check("dy", dy, yl)?;
        self.check("dx", dx, xl)?;
        self.plan(spec, n, true)?;
        let s = self.stream.clone();
        let plan = &self.plans[&(*spec, n)];
        let (ws, ws_len) = workspace_ptr(&self.workspace, &s);
        let (pw, _gw) = w.device_ptr(&s);
        let (pdy, _gdy) = dy.device_ptr(&s);
        let (pdx, _gdx) = dx.device_ptr_mut(&s);
        plan.math(1)?;
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        // SAFETY: as in `forward`.
        unsafe {
            status("cudnnConvolutionBackwardData")(sys::cudnnConvolutionBackwardData(
                self.handle,
                &alpha as *const f32 as *const c_void,
                plan.d.w,
                pw as *const c_void,
                plan.d.y,
                pdy as *const c_void,
                plan.d.conv,
                plan.bwd_data.ok_or_else(|| Error::Cudnn {
                    during: "cudnnConvolutionBackwardData".into(),
                    message: "no backward-data algorithm planned".into(),
                })?,
                ws as *mut c_void,
                ws_len,
                &beta as *const f32 as *const c_void,
                plan.d.x,
                pdx as *mut c_void,
            ))
        }
    }

    /// `dw (+)= dL/dw` from x and dy: added to `dw` when `accumulate`, else written.
    pub fn backward_filter(
        &mut self,
        spec: &ConvSpec,
        n: usize,
        x: &impl DevicePtr<A>,
        dy: &impl DevicePtr<A>,
        dw: &mut impl DevicePtrMut<A>,
        accumulate: bool,
    ) -> Result<()> {
        let (xl, yl, wl) = Self::sizes(spec, n);
        self.check("x", x, xl)?;
        self.check("dy", dy, yl)?;
        self.check("dw", dw, wl)?;
        self.plan(spec, n, false)?;
        let s = self.stream.clone();
        let plan = &self.plans[&(*spec, n)];
        let (ws, ws_len) = workspace_ptr(&self.workspace, &s);
        let (px, _gx) = x.device_ptr(&s);
        let (pdy, _gdy) = dy.device_ptr(&s);
        let (pdw, _gdw) = dw.device_ptr_mut(&s);
        plan.math(2)?;
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        // SAFETY: as in `forward`.
        unsafe {
            status("cudnnConvolutionBackwardFilter")(sys::cudnnConvolutionBackwardFilter(
                self.handle,
                &alpha as *const f32 as *const c_void,
                plan.d.x,
                px as *const c_void,
                plan.d.y,
                pdy as *const c_void,
                plan.d.conv,
                plan.bwd_filter,
                ws as *mut c_void,
                ws_len,
                &beta as *const f32 as *const c_void,
                plan.d.w,
                pdw as *mut c_void,
            ))
        }
    }
}

fn workspace_ptr(ws: &Option<CudaSlice<u8>>, s: &Arc<CudaStream>) -> (u64, usize) {
    match ws {
        // The guard only records a read event for multi-stream tracking; the workspace is only
        // ever used on this one stream.
        Some(w) => (w.device_ptr(s).0, w.len()),
        None => (0, 0),
    }
}

impl<A: Act> Drop for Convolutions<A> {
    fn drop(&mut self) {
        // Plans hold descriptors only; the handle goes last.
        self.plans.clear();
        // SAFETY: the handle was created in `new` and is destroyed once, here.
        unsafe {
            sys::cudnnDestroy(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnDeterminism_t::{CUDNN_DETERMINISTIC, CUDNN_NON_DETERMINISTIC};
    use sys::cudnnMathType_t::CUDNN_DEFAULT_MATH;
    use sys::cudnnStatus_t::{CUDNN_STATUS_NOT_SUPPORTED, CUDNN_STATUS_SUCCESS};

    #[test]
    fn the_fastest_deterministic_algorithm_that_fits_is_chosen() {
        let c = |a: u32, ok: bool, mem: usize, det: bool, ms: f32| -> Ranked<u32> {
            let st = if ok {
                CUDNN_STATUS_SUCCESS
            } else {
                CUDNN_STATUS_NOT_SUPPORTED
            };
            let d = if det {
                CUDNN_DETERMINISTIC
            } else {
                CUDNN_NON_DETERMINISTIC
            };
            (a, st, mem, d, CUDNN_DEFAULT_MATH, ms)
        };
        // Out of time order: the fastest deterministic is 3, not the first listed (1).
        let timed = [
            c(1, true, 0, true, 2.0),
            c(2, true, 0, false, 0.5),
            c(3, true, 0, true, 1.0),
            c(4, false, 0, true, 0.1),
            c(5, true, WORKSPACE_CAP + 1, true, 0.2),
        ];
        assert_eq!(choose(&timed, "t").unwrap().0, 3);
        // Untimed (heuristics): the ranking's order.
        let untimed = [
            c(7, true, 0, false, -1.0),
            c(8, true, 0, true, -1.0),
            c(9, true, 0, true, -1.0),
        ];
        assert_eq!(choose(&untimed, "t").unwrap().0, 8);
        // No deterministic one: the fastest that works.
        let none = [c(1, true, 0, false, 3.0), c(2, true, 0, false, 1.0)];
        assert_eq!(choose(&none, "t").unwrap().0, 2);
        assert!(choose(&[c(1, false, 0, true, 1.0)], "t").is_err());
    }
}
