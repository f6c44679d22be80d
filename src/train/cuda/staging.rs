//! Staging of image batches: NCHW f32 → NHWC on the host into pinned buffers, then to the
//! device on the upload stream, double-buffered so one batch's copy overlaps the previous step.

use super::layout::nchw_to_nhwc;
use super::timing::Phase;
use super::DeviceTrainer;
use crate::cuda::alloc;
use crate::cuda::{drv, Act};
use crate::error::{Error, Result};
use crate::nn::Tensor;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use std::sync::Arc;

/// Two staging slots, each with pinned host buffers and device inputs for both views; the
/// events order each slot's upload after the step that last read it, and the step after the
/// upload.
pub(super) struct Staging<A: Act> {
    /// The upload stream.
    pub(super) copy: Arc<CudaStream>,
    pinned: [[PinnedHostSlice<A>; 2]; 2],
    pub(super) inputs: [[CudaSlice<A>; 2]; 2],
    pub(super) staged: [Option<CudaEvent>; 2],
    pub(super) consumed: [Option<CudaEvent>; 2],
    /// The slot the next step reads.
    pub(super) next: usize,
}

impl<A: Act> Staging<A> {
    /// Buffers for batches of `len` input elements per view, and an upload stream.
    pub(super) fn new(stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        let copy = stream
            .context()
            .new_stream()
            .map_err(drv("creating the upload stream"))?;
        let ctx = stream.context();
        let pin = || -> Result<PinnedHostSlice<A>> {
            // SAFETY: the pinned buffer is written in full (by `stage`) before any copy reads it.
            unsafe { ctx.alloc_pinned::<A>(len) }.map_err(drv("allocating pinned host memory"))
        };
        let pinned = [[pin()?, pin()?], [pin()?, pin()?]];
        let input = || alloc(stream, len, "allocating input batches");
        let inputs = [[input()?, input()?], [input()?, input()?]];
        // The inputs come from the compute stream's pool but are first written on the upload
        // stream: each slot's first upload waits for their allocation, as later ones wait for
        // the step that read them.
        let allocated = || {
            stream
                .record_event(None)
                .map_err(drv("ordering uploads after allocation"))
        };
        let consumed = [Some(allocated()?), Some(allocated()?)];
        Ok(Self {
            copy,
            pinned,
            inputs,
            staged: [None, None],
            consumed,
            next: 0,
        })
    }
}

impl<A: Act> DeviceTrainer<A> {
    fn check_views(&self, a: &Tensor, b: &Tensor) -> Result<()> {
        let (c, h, w) = self.image;
        for (name, t) in [("view 1", a), ("view 2", b)] {
            if t.shape != [self.batch, c, h, w] {
                return Err(Error::InvalidConfig(format!(
                    "{name} has shape {:?}, the trainer was built for [{}, {c}, {h}, {w}]",
                    t.shape, self.batch
                )));
            }
            if t.data.len() != t.shape.iter().product::<usize>() {
                return Err(Error::InvalidConfig(format!(
                    "{name} holds {} values for shape {:?}",
                    t.data.len(),
                    t.shape
                )));
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidConfig(format!(
                    "{name} holds NaN or infinite pixels"
                )));
            }
        }
        Ok(())
    }

    /// Converts two views to NHWC and copies them to the device on the upload stream, into the
    /// buffer the next [`DeviceTrainer::step`] reads. Waits only for the copy out of this pinned
    /// buffer two batches ago.
    pub fn stage(&mut self, a: &Tensor, b: &Tensor) -> Result<()> {
        self.check_views(a, b)?;
        let k = self.staging.next;
        let (c, h, w) = self.image;
        for (v, t) in [a, b].into_iter().enumerate() {
            let host = self.staging.pinned[k][v]
                .as_mut_slice()
                .map_err(drv("waiting for a pinned buffer"))?;
            nchw_to_nhwc(&t.data, (self.batch, c, h, w), host);
        }
        if let Some(e) = &self.staging.consumed[k] {
            self.staging
                .copy
                .wait(e)
                .map_err(drv("ordering an upload after compute"))?;
        }
        let mark = self.timer.start(&self.staging.copy, Phase::Upload)?;
        for v in 0..2 {
            self.staging
                .copy
                .memcpy_htod(&self.staging.pinned[k][v], &mut self.staging.inputs[k][v])
                .map_err(drv("uploading a view"))?;
        }
        self.timer.stop(&self.staging.copy, mark)?;
        self.staging.staged[k] = Some(
            self.staging
                .copy
                .record_event(None)
                .map_err(drv("recording an upload"))?,
        );
        Ok(())
    }
}
