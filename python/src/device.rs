//! CUDA tensors' memory handed to the loss without a copy.
//!
//! PyTorch owns the memory and the stream; the loss runs on a stream of its own on the same
//! (primary) context, forked from PyTorch's current stream by an event and joined back into it by
//! another, so that it sees everything queued before the call and everything queued after it sees
//! the loss. Its workspace is allocated and freed on that stream, which lives as long as the
//! workspace does, whatever becomes of PyTorch's streams. Nothing here waits on the host, and
//! event record/wait is legal inside a CUDA graph capture, so the call can be captured.

use barlow::cuda::{Element, DEVICE_LOSS_SLOTS};
use barlow::{BarlowTwinsLoss, Dims, Error, LossConfig, Result};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, DriverError,
    SyncOnDrop,
};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Device memory someone else owns (a PyTorch tensor), seen through cudarc's buffer traits. It
/// carries no events: ordering comes from the fork and join around each call.
pub struct Foreign<T> {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    _element: PhantomData<T>,
}

impl<T> Foreign<T> {
    /// `len` elements of `T` at `ptr`, used on `stream`.
    ///
    /// # Safety
    /// `ptr` must be the start of `len` elements of `T` of device memory in `stream`'s context,
    /// live and not used by anyone else until the work queued on them through this value is done
    /// (the join orders PyTorch's later work after it).
    pub unsafe fn new(ptr: u64, len: usize, stream: &Arc<CudaStream>) -> Self {
        Self {
            ptr,
            len,
            stream: stream.clone(),
            _element: PhantomData,
        }
    }
}

impl<T> DeviceSlice<T> for Foreign<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for Foreign<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for Foreign<T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

fn driver(during: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Cuda {
        during: during.into(),
        message: e.to_string(),
    }
}

/// The primary context of each device, opened once per process. Event tracking is off: buffers
/// made here are ordered by the fork and join, never by cudarc's per-buffer events (which would
/// also break a graph capture).
fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    static CONTEXTS: OnceLock<Mutex<Vec<Option<Arc<CudaContext>>>>> = OnceLock::new();
    let mut all = lock(CONTEXTS.get_or_init(Mutex::default));
    if let Some(Some(ctx)) = all.get(ordinal) {
        return Ok(ctx.clone());
    }
    let ctx = barlow::cuda::open_stream(ordinal)?.context().clone();
    // SAFETY: no buffer of this context object exists yet, and every buffer made from it is
    // ordered by hand: the workspace is used only on the context's own stream (`OnDevice`), and
    // PyTorch's tensors only between a fork and a join on that stream.
    unsafe { ctx.disable_event_tracking() };
    if all.len() <= ordinal {
        all.resize(ordinal + 1, None);
    }
    all[ordinal] = Some(ctx.clone());
    Ok(ctx)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every call rewrites what it reads, so a panic elsewhere leaves nothing that matters.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The loss on one device: its own stream, the fork and join events, and the loss object whose
/// workspace lives on that stream.
pub struct OnDevice {
    loss: BarlowTwinsLoss,
    stream: Arc<CudaStream>,
    forked: CudaEvent,
    joined: CudaEvent,
}

impl OnDevice {
    fn new(ordinal: usize, config: LossConfig) -> Result<Self> {
        let ctx = context(ordinal)?;
        let stream = ctx
            .new_stream()
            .map_err(driver("creating the loss stream"))?;
        let event = || ctx.new_event(None).map_err(driver("creating an event"));
        Ok(Self {
            loss: BarlowTwinsLoss::new(config)?,
            stream,
            forked: event()?,
            joined: event()?,
        })
    }
}

/// The loss's device-side state for every device it has run on, made on first use.
#[derive(Default)]
pub struct Devices {
    slots: Mutex<Vec<Option<OnDevice>>>,
}

/// What one call hands over: PyTorch's stream and the tensors' addresses (all on one device).
pub struct Call {
    /// CUDA device ordinal of the tensors.
    pub ordinal: usize,
    /// PyTorch's current stream on that device (`torch.cuda.Stream.cuda_stream`).
    pub stream: u64,
    /// The inputs, N×D each, contiguous.
    pub za: u64,
    /// See `za`.
    pub zb: u64,
    /// The inputs' shape.
    pub dims: Dims,
    /// At least one f32: receives [total, on-diagonal, off-diagonal, non-finite flag], as many
    /// as it holds (up to four).
    pub out: u64,
    /// Elements of `out`.
    pub out_len: usize,
    /// dL/dZa and dL/dZb (N×D each, the inputs' type), when the gradients are wanted.
    pub grads: Option<(u64, u64)>,
}

impl Devices {
    /// Queues the loss (and gradients) of `call` after everything already on PyTorch's stream,
    /// with PyTorch's later work ordered after it; returns without waiting.
    ///
    /// # Safety
    /// The addresses in `call` must be live device memory of device `call.ordinal`, sized as
    /// `call` says for element type `T` (`out` f32), the gradients distinct from the inputs and
    /// each other, and `call.stream` a live stream of that device's primary context; the memory
    /// must stay allocated until PyTorch's stream has passed this call (PyTorch's caching
    /// allocator guarantees that for tensors used on that stream).
    pub unsafe fn run<T: Element>(&self, config: &LossConfig, call: &Call) -> Result<()> {
        barlow::cuda::check_available()?;
        let mut slots = lock(&self.slots);
        if slots.get(call.ordinal).is_none_or(Option::is_none) {
            // Made first: it checks that the device exists before the table grows to it.
            let on = OnDevice::new(call.ordinal, *config)?;
            if slots.len() <= call.ordinal {
                slots.resize_with(call.ordinal + 1, || None);
            }
            slots[call.ordinal] = Some(on);
        }
        let Some(Some(on)) = slots.get_mut(call.ordinal) else {
            return Err(Error::NoDevice(format!(
                "device {} was not opened",
                call.ordinal
            )));
        };
        let ctx = on.stream.context();
        ctx.bind_to_thread()
            .map_err(driver("making the device's context current"))?;
        // SAFETY: the caller passes a live stream of this context; the wrapper is dropped before
        // this returns and never destroys the stream.
        let theirs = unsafe { ctx.wrap_borrowed_stream(call.stream as CUstream) };
        let ours = &on.stream;
        on.forked
            .record(&theirs)
            .map_err(driver("recording the fork event"))?;
        ours.wait(&on.forked)
            .map_err(driver("waiting for PyTorch's stream"))?;

        let len = call.dims.n.saturating_mul(call.dims.d);
        // SAFETY: the caller's contract covers the addresses and sizes; the fork above orders
        // this work after PyTorch's writes, the join below PyTorch's later work after it.
        let (za, zb, mut out) = unsafe {
            (
                Foreign::<T>::new(call.za, len, ours),
                Foreign::<T>::new(call.zb, len, ours),
                Foreign::<f32>::new(call.out, call.out_len.min(DEVICE_LOSS_SLOTS), ours),
            )
        };
        let queued = match call.grads {
            Some((ga, gb)) => {
                // SAFETY: as above.
                let (mut ga, mut gb) = unsafe {
                    (
                        Foreign::<T>::new(ga, len, ours),
                        Foreign::<T>::new(gb, len, ours),
                    )
                };
                on.loss.forward_backward_on_device(
                    ours, &za, &zb, call.dims, &mut ga, &mut gb, &mut out,
                )
            }
            None => on
                .loss
                .forward_on_device(ours, &za, &zb, call.dims, &mut out),
        };
        // Joined even when queuing failed part-way, so that PyTorch's stream (and a capture it
        // may be in) never misses the work that was queued.
        let joined = on
            .joined
            .record(ours)
            .and_then(|()| theirs.wait(&on.joined))
            .map_err(driver("joining PyTorch's stream"));
        queued.and(joined)
    }
}

#[cfg(test)]
mod tests {
    //! The fork and join on a device (the project's virtual device where there is no GPU): the
    //! inputs are written on a stream standing in for PyTorch's, read back on it after the call,
    //! and compared with the float64 reference. The virtual device reports any access not
    //! ordered after the write it depends on, so a missing fork or join fails here.

    use super::*;
    use barlow::cpu::reference;
    use barlow::rng::Rng;
    use cudarc::driver::{CudaSlice, DeviceRepr};
    use half::{bf16, f16};

    /// The stream and context of a device to stand in for PyTorch's, or None (after SKIP) when
    /// there is none; BARLOW_REQUIRE_GPU=1 turns the skip into a failure.
    fn theirs() -> Option<Arc<CudaStream>> {
        let reason =
            match barlow::cuda::check_available().and_then(|()| barlow::cuda::device_count()) {
                Ok(0) => "no CUDA device".to_string(),
                Ok(_) => {
                    let ctx = CudaContext::new(0).expect("opening device 0");
                    return Some(ctx.new_stream().expect("a stream of their own"));
                }
                Err(e) => e.to_string(),
            };
        assert!(
            std::env::var("BARLOW_REQUIRE_GPU").as_deref() != Ok("1"),
            "BARLOW_REQUIRE_GPU=1 but: {reason}"
        );
        println!("SKIP: {reason}");
        None
    }

    fn addr<T>(s: &CudaSlice<T>, on: &CudaStream) -> u64 {
        s.device_ptr(on).0
    }

    /// Largest |got − want| over the largest |want|.
    fn rel_err(got: &[f64], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (g, w)| m.max((g - w).abs()));
        if got.iter().all(|v| v.is_finite()) {
            diff / scale
        } else {
            f64::INFINITY
        }
    }

    /// The loss of (za, zb) of element type T through `Devices::run` on `stream`, with the
    /// outputs poisoned with NaN first, checked against the float64 reference within `tol`.
    fn check<T: Element + DeviceRepr>(
        devices: &Devices,
        stream: &Arc<CudaStream>,
        (n, d): (usize, usize),
        seed: u64,
        to: impl Fn(f32) -> T,
        from: impl Fn(T) -> f64,
        tol: f64,
    ) {
        let mut rng = Rng::new(seed);
        // Columns far from zero mean, as projector outputs often are.
        let za: Vec<T> = rng.matrix(n, d).iter().map(|v| to(3.0 + v)).collect();
        let zb: Vec<T> = rng.matrix(n, d).iter().map(|v| to(v * 0.5 - 1.0)).collect();
        let wide = |v: &[T]| v.iter().map(|x| from(*x)).collect::<Vec<f64>>();
        let want = reference::forward_backward(
            &wide(&za),
            &wide(&zb),
            Dims::new(n, d),
            f64::from(0.0051f32),
            f64::from(1e-5f32),
        )
        .unwrap();

        let up = |v: &[T]| stream.clone_htod(v).unwrap();
        let (a, b) = (up(&za), up(&zb));
        let out = stream.clone_htod(&[f32::NAN; 4]).unwrap();
        let poison = vec![to(f32::NAN); n * d];
        let (ga, gb) = (up(&poison), up(&poison));
        let call = Call {
            ordinal: 0,
            stream: stream.cu_stream() as u64,
            za: addr(&a, stream),
            zb: addr(&b, stream),
            dims: Dims::new(n, d),
            out: addr(&out, stream),
            out_len: 4,
            grads: Some((addr(&ga, stream), addr(&gb, stream))),
        };
        // SAFETY: the buffers are live device memory of device 0 with the sizes in `call`, and
        // are read back (below) on the same stream, after the join.
        unsafe { devices.run::<T>(&LossConfig::default(), &call) }.unwrap();

        let out = stream.clone_dtoh(&out).unwrap();
        let total = f64::from(out[barlow::cuda::LOSS_TOTAL]);
        assert!(
            (total - want.total).abs() <= tol * want.total.abs(),
            "loss {total} against {}",
            want.total
        );
        let on = f64::from(out[barlow::cuda::LOSS_ON_DIAG]);
        assert!((on - want.on_diag).abs() <= tol * want.total.abs());
        assert_eq!(out[barlow::cuda::LOSS_NON_FINITE], 0.0);
        let back = |s: &CudaSlice<T>| wide(&stream.clone_dtoh(s).unwrap());
        let (e_a, e_b) = (
            rel_err(&back(&ga), &want.grad_za),
            rel_err(&back(&gb), &want.grad_zb),
        );
        assert!(
            e_a <= tol && e_b <= tol,
            "gradient errors {e_a:.2e}, {e_b:.2e}"
        );
    }

    #[test]
    fn forks_from_and_joins_the_callers_stream() {
        let Some(first) = theirs() else {
            return;
        };
        let devices = Devices::default();
        check::<f32>(&devices, &first, (37, 29), 1, |v| v, f64::from, 1e-5);
        // Another stream of the caller's (PyTorch's current stream changed), the workspace kept.
        let second = first.context().new_stream().unwrap();
        check::<f32>(&devices, &second, (37, 29), 2, |v| v, f64::from, 1e-5);
        // The half types, on a new shape (the workspace regrows).
        check(
            &devices,
            &first,
            (64, 48),
            3,
            bf16::from_f32,
            |v| v.to_f64(),
            1e-2,
        );
        check(
            &devices,
            &second,
            (19, 70),
            4,
            f16::from_f32,
            |v| v.to_f64(),
            1e-2,
        );
    }

    #[test]
    fn bad_calls_are_errors_and_leave_the_stream_usable() {
        let Some(stream) = theirs() else {
            return;
        };
        let devices = Devices::default();
        let buf = stream.clone_htod(&[1f32; 8]).unwrap();
        let call = |n, out_len| Call {
            ordinal: 0,
            stream: stream.cu_stream() as u64,
            za: addr(&buf, &stream),
            zb: addr(&buf, &stream),
            dims: Dims::new(n, 2),
            out: addr(&buf, &stream),
            out_len,
            grads: None,
        };
        // SAFETY: `buf` holds 8 f32, enough for every call here (N ≤ 4, D = 2).
        let run = |c: &Call| unsafe { devices.run::<f32>(&LossConfig::default(), c) };
        assert!(matches!(run(&call(1, 4)), Err(Error::BatchTooSmall { .. })));
        assert!(matches!(
            run(&call(4, 0)),
            Err(Error::BufferTooSmall { .. })
        ));
        let mut far = call(4, 4);
        for ordinal in [99, usize::MAX] {
            far.ordinal = ordinal;
            assert!(matches!(run(&far), Err(Error::NoDevice(_))));
        }
        stream.synchronize().unwrap();
    }
}
