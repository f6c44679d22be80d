//! Parameter gradients. One device: the backward pass writes the flat array LARS reads. A rank
//! of a data-parallel group: the flat array is cut into buckets, each a run of parameters with
//! a buffer of its own; as soon as the last view's backward has finished every parameter of a
//! bucket, the bucket is summed over the ranks on the group's stream and copied into the flat
//! array, while the backward pass goes on with the parameters before it.
//!
//! Buffers of their own keep the backward's writes and the group's reads apart: nothing on the
//! compute stream touches a bucket the group's stream is summing.

use super::plan::{Node, Op, ParamInfo};
use crate::cuda::nccl::Nccl;
use crate::cuda::{alloc, drv};
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut};
use std::sync::Arc;

/// Bucket size used when none is given: big enough that each all-reduce runs near the link's
/// bandwidth, small enough that the first starts early in the backward pass.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

pub(super) struct Grads {
    /// The flat gradient LARS reads, in the parameters' flat layout.
    pub(super) flat: CudaSlice<f32>,
    /// Buckets, in the order the backward pass completes them; empty: one device.
    buckets: Vec<Bucket>,
    /// Per node: the buckets the last view's backward completes there.
    after: Vec<Vec<usize>>,
}

struct Bucket {
    start: usize,
    buf: CudaSlice<f32>,
}

/// The flat range each node's backward writes gradients into: a convolution's or linear
/// layer's weights, a norm's γ and β (contiguous).
fn written(node: &Node, infos: &[ParamInfo]) -> Option<(usize, usize)> {
    match &node.op {
        Op::Conv { p, .. } | Op::Linear { p, .. } => Some((infos[*p].off, infos[*p].len)),
        Op::Norm { p, .. } => {
            let (g, b) = (&infos[*p], infos.get(*p + 1)?);
            Some((g.off, b.off + b.len - g.off))
        }
        Op::MaxPool { .. } | Op::AvgPool => None,
    }
}

impl Grads {
    /// The flat gradient of `total` parameters, zeroed.
    pub(super) fn new(stream: &Arc<CudaStream>, total: usize) -> Result<Self> {
        let mut flat = alloc(stream, total, "allocating gradients")?;
        stream
            .memset_zeros(&mut flat)
            .map_err(drv("zeroing gradients"))?;
        Ok(Self {
            flat,
            buckets: Vec::new(),
            after: Vec::new(),
        })
    }

    /// Cuts the flat gradient into buckets of about `bytes` each. Every bucket is a run of whole
    /// nodes' ranges (a norm's γ and β stay together), taken from the end of the flat layout,
    /// where the backward pass starts; it is complete at the earliest node that writes into it.
    pub(super) fn split(
        &mut self,
        stream: &Arc<CudaStream>,
        infos: &[ParamInfo],
        nodes: &[Node],
        bytes: usize,
    ) -> Result<()> {
        let total = self.flat.len();
        // Starts of the node ranges, and the earliest node writing at or after each.
        let mut ranges: Vec<(usize, usize, usize)> = nodes
            .iter()
            .enumerate()
            .filter_map(|(k, nd)| written(nd, infos).map(|(off, len)| (off, len, k)))
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(super::plan::internal(format!(
                    "gradient ranges {}..{} and {}.. overlap",
                    w[0].0,
                    w[0].0 + w[0].1,
                    w[1].0
                )));
            }
        }
        let per = (bytes / std::mem::size_of::<f32>()).max(1);
        // Cut points, from the end: a bucket closes at the first node range that fills it.
        let mut cuts = vec![total];
        for r in ranges.iter().rev() {
            let end = cuts[cuts.len() - 1];
            if end - r.0 >= per && r.0 > 0 {
                cuts.push(r.0);
            }
        }
        cuts.push(0);
        cuts.reverse();
        cuts.dedup();
        let mut buckets = Vec::with_capacity(cuts.len() - 1);
        let mut after = vec![Vec::new(); nodes.len()];
        for (b, w) in cuts.windows(2).rev().enumerate() {
            let (start, end) = (w[0], w[1]);
            let mut buf = alloc(stream, end - start, "allocating a gradient bucket")?;
            stream
                .memset_zeros(&mut buf)
                .map_err(drv("zeroing a gradient bucket"))?;
            buckets.push(Bucket { start, buf });
            // Complete at the earliest node writing into it (the backward runs nodes backwards).
            let first = ranges
                .iter()
                .filter(|r| r.0 < end && r.0 + r.1 > start)
                .map(|r| r.2)
                .min();
            match first {
                Some(k) => after[k].push(b),
                None => {
                    return Err(super::plan::internal(format!(
                        "gradient bucket {start}..{end} holds no parameter"
                    )))
                }
            }
        }
        self.buckets = buckets;
        self.after = after;
        Ok(())
    }

    /// Number of buckets (0 on one device).
    pub(super) fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Where the backward pass writes the gradient of flat elements `off..off + len`.
    pub(super) fn range_mut(&mut self, off: usize, len: usize) -> Result<CudaViewMut<'_, f32>> {
        if self.buckets.is_empty() {
            return Ok(self.flat.slice_mut(off..off + len));
        }
        // Buckets run from the end of the flat layout to its start.
        let b = self
            .buckets
            .iter_mut()
            .find(|b| b.start <= off)
            .ok_or_else(|| super::plan::internal(format!("no gradient bucket holds {off}")))?;
        let local = off - b.start;
        if local + len > b.buf.len() {
            return Err(super::plan::internal(format!(
                "gradient range {off}..{} straddles a bucket boundary",
                off + len
            )));
        }
        Ok(b.buf.slice_mut(local..local + len))
    }

    /// Zeroes what the backward pass accumulates into.
    pub(super) fn zero(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if self.buckets.is_empty() {
            return stream
                .memset_zeros(&mut self.flat)
                .map_err(drv("zeroing gradients"));
        }
        for b in &mut self.buckets {
            stream
                .memset_zeros(&mut b.buf)
                .map_err(drv("zeroing gradients"))?;
        }
        Ok(())
    }

    /// The buckets the last backward completes at node `k`.
    pub(super) fn completed_at(&self, k: usize) -> &[usize] {
        self.after.get(k).map_or(&[], Vec::as_slice)
    }

    /// Sums bucket `b` over the group after the work queued on `compute` so far, on the group's
    /// stream, and copies it into the flat gradient there. `compute` is not ordered after it:
    /// [`Grads::join`] does that once every bucket is on its way.
    pub(super) fn reduce(&mut self, b: usize, comm: &Nccl, compute: &CudaStream) -> Result<()> {
        let own = comm.stream();
        if own.cu_stream() != compute.cu_stream() {
            let ready = compute
                .record_event(None)
                .map_err(drv("marking a finished gradient bucket"))?;
            own.wait(&ready)
                .map_err(drv("ordering a bucket's all-reduce after the backward"))?;
        }
        let Bucket { start, buf } = self
            .buckets
            .get_mut(b)
            .ok_or_else(|| super::plan::internal(format!("no gradient bucket {b}")))?;
        comm.all_reduce_sum_f32(buf)?;
        let len = buf.len();
        own.memcpy_dtod(&*buf, &mut self.flat.slice_mut(*start..*start + len))
            .map_err(drv("copying a summed gradient bucket"))
    }

    /// Orders `compute` after every bucket's all-reduce and copy.
    pub(super) fn join(&self, comm: &Nccl, compute: &CudaStream) -> Result<()> {
        let own = comm.stream();
        if own.cu_stream() == compute.cu_stream() {
            return Ok(());
        }
        let done = own
            .record_event(None)
            .map_err(drv("marking the end of the gradient all-reduce"))?;
        compute
            .wait(&done)
            .map_err(drv("ordering LARS after the gradient all-reduce"))
    }
}
