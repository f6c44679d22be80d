//! CUDA-event timing of the step's phases, for `barlow bench train`'s breakdown.

use crate::cuda::drv;
use crate::error::Result;
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

/// Time categories of the step breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// cuDNN convolutions, forward and backward.
    Conv,
    /// Batch norm with its fused residual add and ReLU, forward and backward.
    Norm,
    /// Max-pool and global average pool, forward and backward.
    Pool,
    /// The projector's linear layers (cuBLAS), forward and backward.
    Linear,
    /// The fused Barlow Twins loss and its gradient.
    Loss,
    /// Zeroing the gradients and the LARS update.
    Optimizer,
    /// Copying a staged batch to the device, on the upload stream.
    Upload,
}

impl Phase {
    /// Every phase, in the order [`super::DeviceTrainer::timings`] reports them.
    pub const ALL: [Phase; 7] = [
        Phase::Conv,
        Phase::Norm,
        Phase::Pool,
        Phase::Linear,
        Phase::Loss,
        Phase::Optimizer,
        Phase::Upload,
    ];
    /// A lower-case label for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Conv => "convolutions",
            Phase::Norm => "batch norm",
            Phase::Pool => "pooling",
            Phase::Linear => "linear",
            Phase::Loss => "loss",
            Phase::Optimizer => "optimizer",
            Phase::Upload => "upload",
        }
    }
}

/// CUDA-event timing of each phase, when enabled (it adds two events per node).
#[derive(Default)]
pub(super) struct Timer {
    pub(super) on: bool,
    pub(super) marks: Vec<(Phase, CudaEvent, CudaEvent)>,
    pub(super) totals: HashMap<Phase, f64>,
}

impl Timer {
    pub(super) fn start(&mut self, s: &Arc<CudaStream>, phase: Phase) -> Result<Option<usize>> {
        if !self.on {
            return Ok(None);
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = s
            .record_event(flags)
            .map_err(drv("recording a timing event"))?;
        let b = s
            .context()
            .new_event(flags)
            .map_err(drv("creating a timing event"))?;
        self.marks.push((phase, a, b));
        Ok(Some(self.marks.len() - 1))
    }

    pub(super) fn stop(&mut self, s: &Arc<CudaStream>, mark: Option<usize>) -> Result<()> {
        if let Some(i) = mark {
            self.marks[i]
                .2
                .record(s)
                .map_err(drv("recording a timing event"))?;
        }
        Ok(())
    }

    /// Adds the finished marks into the totals (waits for them).
    pub(super) fn collect(&mut self) -> Result<()> {
        for (phase, a, b) in self.marks.drain(..) {
            let ms = a.elapsed_ms(&b).map_err(drv("reading a timing event"))?;
            *self.totals.entry(phase).or_default() += f64::from(ms);
        }
        Ok(())
    }
}
